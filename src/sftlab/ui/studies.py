"""Comparison files -> rating studies.

Accepted JSONL layouts, one comparison per line:
- `sftlab eval --compare` samples: {prompt, answer, base_answer, reference?}; model a is the tuned run,
  model b the base (names from the eval's metrics.json when it is beside the file);
- any two models: {prompt, answer_a, answer_b, model_a?, model_b?, reference?}.
Gold questions (to catch careless raters): {prompt, good, bad}; the right preference is the good answer.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.data.formats import read_jsonl_objects
from sftlab.errors import DataError
from sftlab.ui.runs import find_runs
from sftlab.ui.store import Pair, Store


def load_comparisons(path: Path) -> tuple[list[Pair], str, str]:
    """The pairs of a comparison file and the names of its two models."""
    pairs, names = [], set()
    for where, r in _records(path):
        if isinstance(r.get("answer"), str) and isinstance(r.get("base_answer"), str):
            pairs.append(Pair(_text(r, "prompt", where), r["answer"], r["base_answer"], _reference(r)))
        elif isinstance(r.get("answer_a"), str) and isinstance(r.get("answer_b"), str):
            pairs.append(Pair(_text(r, "prompt", where), r["answer_a"], r["answer_b"], _reference(r)))
            names.add((str(r.get("model_a") or "model a"), str(r.get("model_b") or "model b")))
        else:
            raise DataError(f"{where}: a comparison needs \"prompt\" and two answers: \"answer\" and \"base_answer\" "
                            "(as `sftlab eval --compare` writes) or \"answer_a\" and \"answer_b\"")  # fmt: skip
    if len(names) > 1:
        raise DataError(f"{path}: rows name different models ({sorted(names)}); one file compares one pair")
    if names:
        return pairs, *names.pop()
    return pairs, *_eval_model_names(path)


def load_gold(path: Path) -> list[Pair]:
    gold = []
    for where, r in _records(path):
        gold.append(Pair(_text(r, "prompt", where), _text(r, "good", where), _text(r, "bad", where), gold="a"))
    return gold


def sync_studies(store: Store, runs_dir: Path, compare: list[Path], gold: list[Pair]) -> list[str]:
    """Register every run's base-vs-tuned samples and each --compare file as a study, and return the
    problems found (a bad file is reported, not fatal: the dashboard shows it). Idempotent: an
    unchanged file maps to its existing study and ratings; a changed one becomes a new study."""
    sources = [(name, run / "eval" / "samples.jsonl") for name, run in find_runs(runs_dir).items()]
    sources = [(name, path) for name, path in sources if path.is_file() and _has_base_answers(path)]
    problems = []
    for name, path in sources + [(path.stem, path) for path in compare]:
        try:
            pairs, a, b = load_comparisons(path)
        except DataError as e:
            problems.append(str(e))
            continue
        store.add_study(name, str(path), a, b, pairs + gold)
    return problems


def _records(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    count = 0
    for where, r in read_jsonl_objects(path):
        count += 1
        yield where, r
    if not count:
        raise DataError(f"{path}: the file has no rows")


def _text(r: dict, key: str, where: str) -> str:
    if not isinstance(r.get(key), str) or not r[key].strip():
        raise DataError(f"{where}: \"{key}\" must be a non-empty string")
    return r[key]


def _reference(r: dict) -> str | None:
    return r["reference"] if isinstance(r.get("reference"), str) else None


def _eval_model_names(samples: Path) -> tuple[str, str]:
    """'tuned (SOURCE)' and 'base (SOURCE)' from the eval's metrics.json, else plain 'tuned'/'base'."""
    try:
        models = json.loads((samples.parent / "metrics.json").read_text(encoding="utf-8"))["models"]
        return f"tuned ({models['model']['source']})", f"base ({models['base']['source']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "tuned", "base"


def _has_base_answers(samples: Path) -> bool:
    """An eval run without --compare has no base answers: nothing to compare yet."""
    with open(samples, encoding="utf-8") as f:
        first = f.readline()
    try:
        return "base_answer" in json.loads(first)
    except ValueError:
        return False
