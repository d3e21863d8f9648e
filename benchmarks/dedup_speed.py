"""Near-duplicate detection speed: `sftlab data clean`'s MinHash + LSH on N short examples, against a
naive all-pairs Jaccard baseline timed on a subset and extrapolated (it grows with N squared).

    python benchmarks/dedup_speed.py               # 100,000 examples
    python benchmarks/dedup_speed.py --n 20000 --baseline 2000
"""

from __future__ import annotations

import argparse
import random
import time

from sftlab.curate.quality import CleanSettings, _jaccard, clean, dialogue_text, shingles
from sftlab.data.formats import Conversation, Message

WORDS = ("alpha beta gamma delta river stone garden music cloud paper light happy fast slow north south east west "
         "red green blue small large quiet loud early late open closed warm cold").split()  # fmt: skip


def examples(n: int, seed: int = 0) -> list[Conversation]:
    """Short random Q/A pairs; every 50th is a copy of an earlier one with one word changed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 50 == 49:
            q, a = (m.content for m in out[rng.randrange(i)].messages)
            words = a.split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            a = " ".join(words)
        else:
            q, a = " ".join(rng.choices(WORDS, k=8)), " ".join(rng.choices(WORDS, k=24))
        out.append(Conversation((Message("user", q), Message("assistant", a)), origin=f"bench:{i + 1}"))
    return out


def naive(convs: list[Conversation], threshold: float) -> int:
    sets = [shingles(dialogue_text(c)) for c in convs]
    return sum(any(_jaccard(sets[i], sets[j]) >= threshold for j in range(i)) for i in range(len(sets)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--baseline", type=int, default=3000, help="examples the naive pairwise check runs on")
    args = ap.parse_args()
    convs = examples(args.n)
    settings = CleanSettings(refusals=(), max_repeat=1.0)
    start = time.perf_counter()
    _, rejected = clean(convs, settings)
    lsh_s = time.perf_counter() - start
    start = time.perf_counter()
    naive_found = naive(convs[: args.baseline], settings.near_threshold)
    naive_s = time.perf_counter() - start
    lsh_sub = sum(1 for c, v in rejected if int(c.origin.split(":")[1]) <= args.baseline)
    planted = args.n // 50
    print(f"MinHash+LSH on {args.n:,} examples: {lsh_s:.1f} s, {len(rejected):,} duplicates found ({planted:,} planted)")
    print(f"naive all pairs on the first {args.baseline:,}: {naive_s:.1f} s ({naive_found} found; LSH found {lsh_sub}); "
          f"extrapolated to {args.n:,}: {naive_s * (args.n / args.baseline) ** 2 / 3600:.1f} h")  # fmt: skip


if __name__ == "__main__":
    main()
