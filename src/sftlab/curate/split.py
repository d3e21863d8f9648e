"""`sftlab data split` and `sftlab data stats`: deterministic splits that no near duplicate crosses,
and a dataset survey (counts, turns, token lengths, languages, duplicate rate, a histogram)."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from sftlab.curate.quality import DuplicateIndex, dialogue_text, write_manifest
from sftlab.curate.versions import record_entries
from sftlab.data.formats import Conversation, expand_paths, load_conversations
from sftlab.errors import ConfigError, DataError


def read_with_records(inputs: list[str]) -> tuple[list[Conversation], list[dict], list[Path]]:
    """Conversations and the raw records they came from (for stratification), and the files read."""
    convs, raws, files = [], [], []
    for path in inputs:
        loaded = load_conversations(path)  # a bad record stops here with its file:line
        convs += loaded.conversations
        raws += loaded.records
        files += expand_paths(path)
    return convs, raws, files


def duplicate_groups(convs: list[Conversation], threshold: float = 0.8) -> list[int]:
    """A group id per example; exact and near duplicates (Jaccard >= threshold) share one (union-find)."""
    parent = list(range(len(convs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index = DuplicateIndex(threshold)
    for i, conv in enumerate(convs):
        for j in index.match(i, dialogue_text(conv), index_near=True)[1]:  # near: joins every group it matches
            parent[find(i)] = find(j)
    return [find(i) for i in range(len(convs))]


def assign(groups: list[int], ratios: list[float], seed: int, strata: list[str] | None = None) -> list[int]:
    """Split index per example: whole duplicate groups, shuffled by seed, filled toward each ratio per stratum."""
    members: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[(strata[i] if strata else "", g)].append(i)
    by_stratum: dict[str, list[tuple]] = defaultdict(list)
    for key in members:
        by_stratum[key[0]].append(key)
    rng = random.Random(seed)
    split = [0] * len(groups)
    for stratum in sorted(by_stratum):
        keys = sorted(by_stratum[stratum], key=lambda k: members[k][0])
        rng.shuffle(keys)
        total = sum(len(members[k]) for k in keys)
        filled = [0] * len(ratios)
        for key in keys:  # the split furthest below its target takes the next group
            target = max(range(len(ratios)), key=lambda s: ratios[s] * total - filled[s])
            for i in members[key]:
                split[i] = target
            filled[target] += len(members[key])
    return split


def run_split(inputs: list[str], output: str, ratios: list[float], names: list[str], seed: int,
              stratify: str | None, threshold: float = 0.8, say=print) -> dict:  # fmt: skip
    if len(ratios) != len(names) or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(f"--ratios {ratios} must be {len(names)} non-negative numbers summing to 1")
    convs, raws, files = read_with_records(inputs)
    strata = None
    if stratify:
        missing = [c.origin for c, r in zip(convs, raws) if stratify not in r]
        if missing:
            raise DataError(f"{missing[0]}: no field {stratify!r} to stratify by ({len(missing)} records lack it)")
        strata = [str(r[stratify]) for r in raws]
    split = assign(duplicate_groups(convs, threshold), ratios, seed, strata)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(split)
    parts = [(f"{name}.jsonl", [raw for raw, where in zip(raws, split) if where == s]) for s, name in enumerate(names)]
    for file, rows in parts:
        with open(out / file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(raw, ensure_ascii=False) + "\n" for raw in rows)
    report = {name: counts.get(s, 0) for s, name in enumerate(names)}
    write_manifest(out, files, [file for file, _ in parts],
                   {"settings": {"ratios": ratios, "seed": seed, "stratify": stratify, "near_threshold": threshold}},
                   report, record_entries(parts))  # fmt: skip
    say("split " + ", ".join(f"{n}: {c}" for n, c in report.items()) + f" -> {out} (near duplicates kept together)")
    return report


def run_stats(inputs: list[str], tokenizer, output: str | None = None, say=print) -> dict:
    import langid

    from sftlab.curate.quality import tokens

    convs, _, _ = read_with_records(inputs)
    lengths = sorted(len(tokenizer(dialogue_text(c), add_special_tokens=False)["input_ids"]) for c in convs)
    turns = [sum(m.role == "assistant" for m in c.messages) or 1 for c in convs]
    langs = Counter(langid.classify(dialogue_text(c)[:1000])[0] for c in convs[:2000])
    groups = duplicate_groups(convs)
    pct = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    stats = {"records": len(convs), "assistant_turns": {"mean": round(sum(turns) / len(turns), 2), "max": max(turns)},
             "tokens": {"mean": round(sum(lengths) / len(lengths), 1), "p50": pct(0.5), "p95": pct(0.95),
                        "max": lengths[-1], "total": sum(lengths)},
             "words": sum(len(tokens(dialogue_text(c))) for c in convs),
             "languages": dict(langs.most_common()), "duplicate_rate": round(1 - len(set(groups)) / len(convs), 4)}  # fmt: skip
    say(json.dumps(stats, indent=1, ensure_ascii=False))
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
        _histogram(lengths, out / "lengths.png")
        say(f"wrote {out}/stats.json and lengths.png")
    return stats


def _histogram(lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="tab:blue")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
