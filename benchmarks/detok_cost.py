"""Per-token cost of turning a growing answer into streamed text: the whole-sequence decode (the
serving engine's way before its incremental detokenizer) against sftlab.serve.engine._Row, in one run.

    python benchmarks/detok_cost.py                  # 4,000 tokens, four 256-character stop strings
    python benchmarks/detok_cost.py --tokens 8000 --stops 0

Prints microseconds per token over the first and the last 200 tokens for both, and their ratio: the
whole decode grows with the answer's length, the incremental one must not.
"""

from __future__ import annotations

import argparse
import time

from sftlab.config import ModelConfig
from sftlab.model.load import load_tokenizer
from sftlab.serve.engine import Request, _Row

TEXT = ("Rivers carry water from the hills to the sea; 東京 and Zoë's notes 🌊 travel along. " * 400)


class _Sink:
    def put_nowait(self, event):
        pass


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


def whole_decode(tok, ids: list[int], stops: list[str]) -> list[float]:
    """The old way: decode everything so far each token, then look for the stops near the end."""
    times, sent = [], 0
    for n in range(1, len(ids) + 1):
        t = time.perf_counter()
        text = tok.decode(ids[:n], skip_special_tokens=True)
        for stop in stops:
            text.find(stop, max(0, sent - len(stop)))
        sent = len(text)
        times.append(time.perf_counter() - t)
    return times


def incremental(tok, ids: list[int], stops: list[str]) -> list[float]:
    row = _Row(Request([1], "m", len(ids) + 1, temperature=0, stop=stops, events=_Sink(), loop=_Loop()), 0)
    times = []
    for token in ids:
        t = time.perf_counter()
        row.ids.append(token)
        row.text_delta(tok)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--stops", type=int, default=4, help="stop strings of 256 characters that never match")
    args = p.parse_args()
    tok = load_tokenizer(ModelConfig(name="smollm2-135m-instruct"))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][: args.tokens]
    stops = [f"<never {i}>" + "x" * 246 for i in range(args.stops)]
    print(f"{len(ids)} tokens, {len(stops)} stop strings of 256 characters")
    print(f"{'':14}{'first 200 µs/token':>20}{'last 200 µs/token':>20}")
    rows = {}
    for name, fn in (("whole decode", whole_decode), ("incremental", incremental)):
        times = fn(tok, ids, stops)
        rows[name] = (sum(times[:200]) / 200 * 1e6, sum(times[-200:]) / 200 * 1e6)
        print(f"{name:14}{rows[name][0]:20.1f}{rows[name][1]:20.1f}")
    print(f"whole/incremental at the end: {rows['whole decode'][1] / rows['incremental'][1]:.1f}x")


if __name__ == "__main__":
    main()
