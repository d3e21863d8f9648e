"""Results of a rating study: win rates with 95% intervals, mean scores, gold checks and agreement.

Each rating is one unit (an item rated by three people counts three times). Gold items measure the
raters and never enter win rates or scores. Cohen's kappa is a few lines here (scikit-learn would be
a large dependency for one formula); Krippendorff's alpha comes from the `krippendorff` package.
"""

from __future__ import annotations

import math
from collections import defaultdict

from sftlab.ui.store import DIMENSIONS

Z95 = 1.959963984540054
GOLD_PASS = 0.75  # raters right on fewer of their gold items than this are flagged as careless
CATEGORIES = ("a", "b", "tie")


def results(ratings: list[dict], exclude_flagged: bool = False) -> dict:
    raters = gold_checks(ratings)
    flagged = {name for name, r in raters.items() if r["flagged"]}
    used = [r for r in ratings if r["gold"] is None and not (exclude_flagged and r["annotator"] in flagged)]
    return {"ratings": len(used), "excluded_flagged": exclude_flagged, "annotators": list(raters.values()),
            "preference": preference(used), "scores": scores(used), "agreement": agreement(used)}  # fmt: skip


def gold_checks(ratings: list[dict]) -> dict[str, dict]:
    raters: dict[str, dict] = {}
    for r in ratings:
        rater = raters.setdefault(r["annotator"], {"name": r["annotator"], "ratings": 0, "gold_answered": 0,
                                                   "gold_correct": 0, "seconds": 0.0})  # fmt: skip
        rater["seconds"] += r["seconds"] or 0.0
        if r["gold"] is None:
            rater["ratings"] += 1
        else:
            rater["gold_answered"] += 1
            rater["gold_correct"] += r["preference"] == r["gold"]
    for rater in raters.values():
        answered = rater["gold_answered"]
        rater["gold_accuracy"] = rater["gold_correct"] / answered if answered else None
        rater["flagged"] = bool(answered) and rater["gold_correct"] / answered < GOLD_PASS
    return raters


def preference(used: list[dict]) -> dict:
    """Model a's win rate over b with ties as half a win, and its 95% Wilson score interval."""
    counts = {c: sum(r["preference"] == c for r in used) for c in CATEGORIES}
    n = len(used)
    rate = (counts["a"] + counts["tie"] / 2) / n if n else None
    return {"a_wins": counts["a"], "b_wins": counts["b"], "ties": counts["tie"], "n": n, "win_rate_a": rate,
            "ci95": wilson(rate, n) if n else None}  # fmt: skip


def wilson(p: float, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval; with ties as half wins the per-rating variance is at most p(1-p), so
    the interval is, if anything, conservative."""
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, center - half), min(1.0, center + half)]


def scores(used: list[dict]) -> dict:
    """Mean 1-5 score per dimension and model, with a normal-approximation 95% interval (kept in 1-5)."""
    return {dim: {side: mean_ci([r[f"{dim}_{side}"] for r in used], 1, 5) for side in ("a", "b")}
            for dim in DIMENSIONS}  # fmt: skip


def mean_ci(values: list[float], low: float, high: float) -> dict:
    n = len(values)
    if not n:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [max(low, mean - half), min(high, mean + half)], "n": n}


def agreement(used: list[dict]) -> dict:
    """Agreement on the preference: Cohen's kappa for two raters, Krippendorff's alpha (nominal) for more."""
    by_rater: dict[str, dict[int, str]] = defaultdict(dict)
    for r in used:
        by_rater[r["annotator"]][r["item"]] = r["preference"]
    names = sorted(by_rater)
    shared = [i for i in {i for d in by_rater.values() for i in d} if sum(i in d for d in by_rater.values()) >= 2]
    base = {"raters": len(names), "items": len(shared)}
    if len(names) < 2 or not shared:
        return {**base, "method": None, "value": None, "note": "needs two raters on the same items"}
    if len(names) == 2:
        pairs = [(by_rater[names[0]][i], by_rater[names[1]][i]) for i in shared]
        return {**base, "method": "cohen_kappa", "value": cohen_kappa(pairs)}
    return {**base, "method": "krippendorff_alpha", "value": krippendorff_alpha(by_rater, sorted(shared))}


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    n = len(pairs)
    observed = sum(x == y for x, y in pairs) / n
    expected = sum((sum(x == c for x, _ in pairs) / n) * (sum(y == c for _, y in pairs) / n) for c in CATEGORIES)
    return None if expected == 1 else (observed - expected) / (1 - expected)  # one category only: undefined


def krippendorff_alpha(by_rater: dict[str, dict[int, str]], items: list[int]) -> float | None:
    import krippendorff
    import numpy as np

    code = {c: i for i, c in enumerate(CATEGORIES)}
    data = np.array([[code[d[i]] if i in d else np.nan for i in items] for d in by_rater.values()], dtype=float)
    if len({v for v in data[~np.isnan(data)]}) < 2:
        return None  # a single category: no disagreement to measure, alpha undefined
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
