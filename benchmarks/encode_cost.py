"""Where one worker's time goes when it encodes chats: the records (parsing the JSONL lines the reader hands
on, making conversations), the renders, the tokenizer and the rest (labels, lengths, the Arrow batch), in CPU
milliseconds a chat, and the renders and the tokenizer against one plain `apply_chat_template` render and one
tokenizer call of each whole chat (what the plain HF way does), in one run.

    python benchmarks/encode_cost.py                 # 6,144 generated chats (tokenize_speed.py's), best of 4
    python benchmarks/encode_cost.py --chats 20000 --rounds 2
    python benchmarks/encode_cost.py --reply-words 200 600

One process, one tokenizer thread and the heap frozen (as in a forked worker of sftlab.data.pipeline: unfrozen,
the collector's passes over torch's and transformers' objects land mostly in the renders), SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a worker's setting (pipeline._forked_pool)
sys.path.insert(0, str(Path(__file__).parent))

from tokenize_speed import REPLY_WORDS, write_chats  # noqa: E402

from sftlab.config import DatasetSpec, load_config  # noqa: E402
from sftlab.data import pipeline, sources  # noqa: E402
from sftlab.data.formats import LoadResult, iter_conversations  # noqa: E402
from sftlab.data.templates import ChatTemplate, end_of_turn_ids  # noqa: E402
from sftlab.data.tokenize import Encoder  # noqa: E402
from sftlab.model.load import load_tokenizer  # noqa: E402


def _timed(spent: Counter, name: str, fn):
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.process_time() - start

    return timed


def _best_rounds(rounds: int, spent: Counter, passes: dict) -> dict:
    """`spent` (the timed parts, filled by the first pass) and each pass's CPU time, of the round whose first
    pass was fastest."""
    best: dict = {}
    for _ in range(rounds):
        spent.clear()
        for name, run in passes.items():
            start = time.process_time()
            run()
            spent[name] = time.process_time() - start
        if not best or spent["total"] < best["total"]:
            best = dict(spent)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chats", type=int, default=6144)
    p.add_argument("--rounds", type=int, default=4, help="best of this many passes")
    p.add_argument("--reply-words", type=int, nargs=2, default=REPLY_WORDS, metavar=("MIN", "MAX"),
                   help="words in each assistant reply (tokenize_speed.py's option)")
    args = p.parse_args()
    cfg = load_config(None, ["data.max_length=4096"])
    tok = load_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        write_chats(path, args.chats, reply_words=tuple(args.reply_words))
        convs = [conv for conv, _ in iter_conversations(str(path))]
        conversion, records = sources.spec_records(DatasetSpec(path=str(path)), LoadResult())
        records = list(records)
    encoder = Encoder(tok, ChatTemplate(tok), "assistant", end_of_turn_ids(tok))
    spent: Counter = Counter()
    encoder.template.examples = _timed(spent, "renders", encoder.template.examples)
    encoder.piece_ids = _timed(spent, "tokenizer", encoder.piece_ids)  # the joined pieces and any piece alone
    pipeline._conversations = _timed(spent, "records", pipeline._conversations)
    job, chunk = (encoder, cfg.data, 1.0, conversion), pipeline.CHUNK
    plain = [[{"role": m.role, "content": m.content} for m in c.messages] for c in convs]
    whole = [tok.apply_chat_template(chat, tokenize=False) for chat in plain]
    pipeline._encode(records[:chunk], job)  # compiled template, tokenizer probe
    passes = {
        "total": lambda: [pipeline._encode(records[i : i + chunk], job) for i in range(0, len(records), chunk)],
        "one render": lambda: [tok.apply_chat_template(chat, tokenize=False) for chat in plain],
        "one tokenizer call": lambda: [tok(whole[i : i + chunk], add_special_tokens=False)
                                       for i in range(0, len(whole), chunk)],
    }  # fmt: skip
    with pipeline._frozen_heap():
        best = _best_rounds(args.rounds, spent, passes)
    best["rest"] = best["total"] - best["records"] - best["renders"] - best["tokenizer"]
    ms = {k: v / len(convs) * 1e3 for k, v in best.items()}
    print(f"{len(convs):,} chats, CPU ms a chat (best of {args.rounds}):")
    for name in ("total", "records", "renders", "tokenizer", "rest"):
        print(f"  {name:10} {ms[name]:.4f}  ({ms[name] / ms['total']:.0%})")
    print(f"  apply_chat_template once a chat: {ms['one render']:.4f}; sftlab's renders / that: "
          f"{ms['renders'] / ms['one render']:.2f}x")
    print(f"  the tokenizer on each whole render, in batches: {ms['one tokenizer call']:.4f}; sftlab's tokenizer / "
          f"that: {ms['tokenizer'] / ms['one tokenizer call']:.2f}x")


if __name__ == "__main__":
    main()
