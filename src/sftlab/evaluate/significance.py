"""How sure a base-vs-tuned delta is: a 95% interval for every delta that has per-item scores.

Both models answer the same items, so the comparison is paired: the interval is a paired bootstrap over
items (resample items, recompute both models' metric on the same resample, take the 2.5th and 97.5th
percentiles of the difference), which also serves corpus metrics (BLEU, chrF are recomputed on each
resample). For accuracies (items right or wrong) McNemar's exact test on the discordant items gives the
p-value. A delta is significant when its interval excludes 0 (and, for accuracies, p < 0.05).
Written by hand: scipy's bootstrap does not pair a corpus statistic, and the test is a binomial sum.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

RESAMPLES = 2000
CORPUS_RESAMPLES = 500  # a corpus metric is recomputed per resample (sacrebleu: milliseconds each)
LEVEL = 0.95


@dataclass
class PerItem:
    """One metric's evidence for one model: each item's score (the metric is their mean), or the items
    themselves with the corpus statistic that turns a selection of them into the metric."""

    scores: list[float] | None = None
    items: list | None = None
    corpus: Callable[[list], float] | None = None
    binary: bool = False  # scores are right/wrong (0 or 100): McNemar applies

    def __len__(self) -> int:
        return len(self.scores if self.scores is not None else self.items)

    def whole(self) -> float:
        """The metric over every item."""
        return self.value(list(range(len(self))))

    def value(self, idx: list[int]) -> float:
        if self.scores is not None:
            return sum(self.scores[i] for i in idx) / max(len(idx), 1)
        return self.corpus([self.items[i] for i in idx])


def mean_scores(scores: list[float], binary: bool = False) -> PerItem:
    return PerItem(scores=[float(s) for s in scores], binary=binary)


def interval(base: PerItem, tuned: PerItem, seed: int = 0) -> dict:
    """{low, high, significant, items[, p]} for tuned - base over the same items."""
    n = len(base)
    resamples = RESAMPLES if base.scores is not None else CORPUS_RESAMPLES
    if n != len(tuned) or n < 2:
        return {"low": None, "high": None, "significant": False, "items": n}
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(tuned.value(idx) - base.value(idx))
    diffs.sort()
    low, high = _percentile(diffs, (1 - LEVEL) / 2), _percentile(diffs, 1 - (1 - LEVEL) / 2)
    out = {"low": low, "high": high, "significant": low > 0 or high < 0, "items": n}
    if base.binary and tuned.binary:
        out["p"] = mcnemar_exact([s > 0 for s in base.scores], [s > 0 for s in tuned.scores])
        out["significant"] = out["significant"] and out["p"] < 1 - LEVEL
    return out


def mcnemar_exact(base: list[bool], tuned: list[bool]) -> float:
    """Two-sided exact McNemar p-value: of the items the models disagree on, how unlikely a split at least
    this uneven is when either model is as likely to be the one right (a fair binomial)."""
    b = sum(x and not y for x, y in zip(base, tuned))
    c = sum(y and not x for x, y in zip(base, tuned))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _percentile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def token_mean(pairs: list[tuple[float, int]]) -> float:
    """The eval loss of a selection of examples' (loss sum, tokens): token-weighted, as the loss itself."""
    return sum(s for s, _ in pairs) / max(sum(n for _, n in pairs), 1)


def loss_evidence(pairs: list[tuple[float, int]]) -> dict[str, PerItem]:
    return {"eval/loss": PerItem(items=pairs, corpus=token_mean),
            "eval/ppl": PerItem(items=pairs, corpus=lambda ps: math.exp(min(token_mean(ps), 50.0)))}  # fmt: skip


def intervals(base: dict[str, PerItem], tuned: dict[str, PerItem], seed: int = 0) -> dict[str, dict]:
    """An interval for every metric both models have per-item evidence for."""
    return {k: interval(base[k], tuned[k], seed) for k in tuned if k in base}


def text_evidence(predictions: list[str], references: list[str], scorers=None) -> dict[str, PerItem]:
    """Per-item evidence of the generation metrics (sftlab.metrics.text.text_metrics' keys; each one's
    `whole()` is that metric). `scorers`: a metrics.text.Scorers, or a bare sentence encoder."""
    from sftlab.metrics.text import as_scorers, bleu, chrf, exact_matches, rouge_per_item

    pairs = list(zip(predictions, references))
    out = {"bleu": PerItem(items=pairs, corpus=lambda ps: bleu([p for p, _ in ps], [r for _, r in ps])),
           "chrf": PerItem(items=pairs, corpus=lambda ps: chrf([p for p, _ in ps], [r for _, r in ps]))}  # fmt: skip
    out |= {k: mean_scores(v) for k, v in rouge_per_item(predictions, references).items()}
    out["exact_match"] = mean_scores([100 * h for h in exact_matches(predictions, references)], binary=True)
    scorers = as_scorers(scorers)
    if scorers.semantic is not None:
        similarities = scorers.semantic.similarities(predictions, references)
        out["semantic_similarity"] = mean_scores([100 * x for x in similarities])
    if scorers.bertscore is not None:
        out |= {k: mean_scores(v) for k, v in scorers.bertscore.scores(predictions, references).items()}
    if scorers.meteor is not None:
        out["meteor"] = mean_scores(scorers.meteor.scores(predictions, references))
    return out
