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


def run_stats(inputs: list[str], tokenizer, output: str | None = None, say=print, by: str | None = None) -> dict:
    """The survey of `inputs`; `by` (metadata.<key>, dotted for nested keys) adds counts and lengths per value."""
    import langid

    from sftlab.curate.quality import tokens

    convs, _, _ = read_with_records(inputs)
    lengths = [len(tokenizer(dialogue_text(c), add_special_tokens=False)["input_ids"]) for c in convs]
    turns = [sum(m.role == "assistant" for m in c.messages) or 1 for c in convs]
    langs = Counter(langid.classify(dialogue_text(c)[:1000])[0] for c in convs[:2000])
    groups = duplicate_groups(convs)
    stats = {"records": len(convs), "assistant_turns": {"mean": round(sum(turns) / len(turns), 2), "max": max(turns)},
             "tokens": _lengths(lengths), "words": sum(len(tokens(dialogue_text(c))) for c in convs),
             "languages": dict(langs.most_common()), "duplicate_rate": round(1 - len(set(groups)) / len(convs), 4)}  # fmt: skip
    if by:
        stats["by"] = {by: _grouped(convs, lengths, turns, by)}
    say(json.dumps(stats, indent=1, ensure_ascii=False))
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False), encoding="utf-8")
        _histogram(sorted(lengths), out / "lengths.png")
        say(f"wrote {out}/stats.json and lengths.png")
    return stats


def _lengths(lengths: list[int]) -> dict:
    s = sorted(lengths)
    pct = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"mean": round(sum(s) / len(s), 1), "p50": pct(0.5), "p95": pct(0.95), "max": s[-1], "total": sum(s)}


NO_VALUE = "(none)"  # the group of records whose metadata lacks the key


def _grouped(convs: list[Conversation], lengths: list[int], turns: list[int], by: str) -> dict:
    """{value: {records, assistant_turns, tokens}} of `by` = metadata.<key>; values as the records hold them
    (a number or a list is shown as its JSON), most records first."""
    if not by.startswith("metadata.") or by == "metadata.":
        raise ConfigError(f"--by {by}: group by a metadata key, e.g. --by metadata.category (records' "
                          "`metadata` objects; dotted for nested keys: metadata.source.name)")  # fmt: skip
    path = by.split(".")[1:]
    members: dict[str, list[int]] = defaultdict(list)
    for i, conv in enumerate(convs):
        members[_group_key(conv.metadata, path)].append(i)
    ordered = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {key: {"records": len(idx), "assistant_turns": round(sum(turns[i] for i in idx) / len(idx), 2),
                  "tokens": _lengths([lengths[i] for i in idx])} for key, idx in ordered}  # fmt: skip


def _group_key(metadata: dict | None, path: list[str]) -> str:
    value = metadata
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return NO_VALUE
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


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
