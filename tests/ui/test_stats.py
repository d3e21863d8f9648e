"""Win rates with Wilson intervals, agreement (kappa, alpha) and gold-question checks, against hand computations."""

import pytest

from sftlab.ui import stats
from sftlab.ui.store import DIMENSIONS


def test_win_rate_interval_kappa_and_alpha_against_hand_computations():
    # Wilson interval for 5 of 10: the textbook value 0.2366-0.7634.
    assert stats.wilson(0.5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    # Cohen's kappa: agree on 3 of 4 (p_o = .75); marginals a:(2,1) b:(1,2) tie:(1,1) -> p_e = (2+2+1)/16.
    pairs = [("a", "a"), ("b", "b"), ("tie", "tie"), ("a", "b")]
    assert stats.cohen_kappa(pairs) == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    assert stats.cohen_kappa([("a", "a"), ("a", "a")]) is None  # one category: undefined, not 1 or 0
    # Krippendorff's alpha (nominal), three raters with a missing value, via the coincidence matrix:
    # item 1: a,a,a  item 2: a,b,(missing)  item 3: b,b,tie. Pairable values n = 8.
    by_rater = {"r1": {1: "a", 2: "a", 3: "b"}, "r2": {1: "a", 2: "b", 3: "b"}, "r3": {1: "a", 3: "tie"}}
    observed_disagreement = (0 + 2 / 1 + 4 / 2) / 8  # ordered unequal pairs / (m_u - 1), over n
    n_a, n_b, n_t = 4, 3, 1
    expected_disagreement = (2 * (n_a * n_b + n_a * n_t + n_b * n_t)) / (8 * 7)
    assert stats.krippendorff_alpha(by_rater, [1, 2, 3]) == pytest.approx(1 - observed_disagreement / expected_disagreement)


def test_gold_questions_flag_careless_raters_and_never_count_in_win_rates():
    def r(name, item, pref, gold=None):
        return {"annotator": name, "item": item, "preference": pref, "gold": gold, "seconds": 1.0,
                **{f"{d}_{s}": 3 for d in DIMENSIONS for s in "ab"}}  # fmt: skip

    ratings = [r("ann", 1, "a"), r("ann", 9, "a", gold="a"), r("bob", 1, "b"), r("bob", 9, "b", gold="a")]
    out = stats.results(ratings)
    assert {x["name"]: x["flagged"] for x in out["annotators"]} == {"ann": False, "bob": True}
    assert out["preference"]["n"] == 2 and out["preference"]["win_rate_a"] == 0.5
    assert stats.results(ratings, exclude_flagged=True)["preference"]["win_rate_a"] == 1.0
