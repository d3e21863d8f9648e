"""Chats per second and peak memory of getting a chat dataset to tokens: sftlab's pipeline against the plain
Hugging Face way and TRL's SFTTrainer preparation, each in its own process, in one run.

    python benchmarks/tokenize_speed.py                   # 100,000 generated chats, SmolLM2's tokenizer
    python benchmarks/tokenize_speed.py --chats 1000000   # long: run it in the background, never in CI
    python benchmarks/tokenize_speed.py --rounds 3        # each pipeline 3 times, interleaved: best of 3
    python benchmarks/tokenize_speed.py --reply-words 200 600   # longer replies (10-60 words by default)

    sftlab   load_split (read, render with the chat template, tokenize, masks, report; cache off;
             data.num_proc = --procs)
    hf       datasets.load_dataset(json) + map(apply_chat_template(tokenize=True)), batched, --procs
             processes, no masks (the loss then covers every token)
    trl      SFTTrainer(...) building its train dataset (apply_chat_template + tokenize, --procs processes;
             TRL's default for conversational data: no assistant-only masks)

The chats: 1-3 user/assistant turns, 30% with a system prompt, words drawn from a fixed vocabulary by seed.
Peak RSS is each process's maximum resident set (ru_maxrss), the parent's dataset write excluded. With
--rounds N the pipelines run in turn N times and each one's best time counts: on a shared machine a
neighbour's load then slows a round of every pipeline, not one pipeline's only run.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["river", "stone", "garden", "light", "music", "cloud", "happy", "fast", "water", "number", "answer",
         "question", "city", "tree", "market", "window", "paper", "ocean", "mountain", "field"]  # fmt: skip
REPLY_WORDS = (10, 60)  # words in an assistant reply, drawn between these by default


def write_chats(path: Path, n: int, seed: int = 0, reply_words: tuple[int, int] = REPLY_WORDS) -> None:
    rng = random.Random(seed)

    def say(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": say(8)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": say(rng.randint(5, 30)) + "?"},
                             {"role": "assistant", "content": say(rng.randint(*reply_words)) + "."}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")


def run_sftlab(path: str, procs: int) -> int:
    from sftlab.config import load_config
    from sftlab.data.dataset import load_split
    from sftlab.model.load import load_tokenizer

    cfg = load_config(None, [f"data.train=[{path}]", "data.cache=false", "data.max_length=4096",
                             f"data.num_proc={procs}"])  # fmt: skip
    return len(load_split(cfg.data, load_tokenizer(cfg.model)).dataset)


def run_hf(path: str, procs: int) -> int:
    import datasets

    tok = _tokenizer()
    data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=_fresh_cache())

    def render(batch):
        return {"input_ids": tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)}

    return len(data.map(render, batched=True, num_proc=procs, remove_columns=["messages"]))


def run_trl(path: str, procs: int) -> int:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = _tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=_fresh_cache())
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, dataset_num_proc=procs, report_to=[], max_length=4096, use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    del torch
    return len(trainer.train_dataset)


def _fresh_cache() -> str:
    """An empty datasets cache for this run, so a later round reads and maps the file again (a reused cache
    would hand back the first round's Arrow files); on the disk sftlab's own scratch output goes to."""
    from sftlab.files import scratch_dir

    return str(scratch_dir("hf-datasets-"))


def _tokenizer():
    from sftlab.config import ModelConfig
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


RUNNERS = {"sftlab": run_sftlab, "hf": run_hf, "trl": run_trl}


def child(name: str, path: str, procs: int) -> None:
    """One measurement in this process: prints {seconds, rows, peak_rss_mb} as JSON."""
    start = time.perf_counter()
    rows = RUNNERS[name](path, procs)
    seconds = time.perf_counter() - start
    usage = resource.getrusage
    peak = max(usage(resource.RUSAGE_SELF).ru_maxrss, usage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(json.dumps({"seconds": seconds, "rows": rows, "peak_rss_mb": peak / 1024}))


def _measure(name: str, path: Path, procs: int) -> dict | None:
    out = subprocess.run([sys.executable, __file__, "--procs", str(procs), "--child", name, str(path)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if out.returncode != 0:
        print(f"{name}: failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chats", type=int, default=100_000)
    p.add_argument("--reply-words", type=int, nargs=2, default=REPLY_WORDS, metavar=("MIN", "MAX"),
                   help="words in each assistant reply, drawn between these")
    p.add_argument("--procs", type=int, default=2, help="processes of each pipeline (sftlab's data.num_proc)")
    p.add_argument("--only", nargs="*", choices=list(RUNNERS), default=list(RUNNERS))
    p.add_argument("--rounds", type=int, default=1, help="run the pipelines in turn this many times; best time counts")
    p.add_argument("--child", nargs=2, metavar=("RUNNER", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.procs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chats.jsonl"
        write_chats(path, args.chats, reply_words=tuple(args.reply_words))
        print(f"{args.chats:,} chats ({path.stat().st_size / 2**20:.0f} MiB), {args.procs} processes for hf/trl")
        results: dict[str, dict] = {}
        peaks: dict[str, float] = {}  # the highest peak RSS of any round
        for round_ in range(args.rounds):
            for name in args.only:
                r = _measure(name, path, args.procs)
                if r is None:
                    continue
                best = results.setdefault(name, r)
                if r["seconds"] < best["seconds"]:
                    results[name] = r
                peaks[name] = max(peaks.get(name, 0), r["peak_rss_mb"])
                print(f"{name:7} {r['seconds']:8.1f} s  {args.chats / r['seconds']:9,.0f} chats/s  "
                      f"peak RSS {r['peak_rss_mb']:7,.0f} MiB  ({r['rows']:,} rows)"
                      + (f"  round {round_ + 1}" if args.rounds > 1 else ""))
        if args.rounds > 1:
            for name, r in results.items():
                print(f"best    {name:7} {r['seconds']:8.1f} s  {args.chats / r['seconds']:9,.0f} chats/s  "
                      f"peak RSS of any round {peaks[name]:7,.0f} MiB")
        if "sftlab" in results:
            for peer in ("hf", "trl"):
                if peer in results:
                    print(f"sftlab / {peer} speed: {results[peer]['seconds'] / results['sftlab']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
