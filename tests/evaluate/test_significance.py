"""Intervals for base-vs-tuned deltas: McNemar's exact test and the paired bootstrap, checked against
values computed by hand and against scipy."""

import pytest

from sftlab.evaluate.significance import PerItem, interval, mcnemar_exact, mean_scores, text_evidence


def test_mcnemar_exact_matches_the_binomial():
    from scipy.stats import binomtest

    assert mcnemar_exact([False] * 6, [True] * 6) == pytest.approx(2 / 64)  # 6 discordant, all one way
    base = [True] * 10 + [False] * 8 + [True] * 2 + [False] * 5
    tuned = [True] * 10 + [True] * 8 + [False] * 2 + [False] * 5  # b = 2, c = 8
    assert mcnemar_exact(base, tuned) == pytest.approx(binomtest(2, 10, 0.5).pvalue)
    assert mcnemar_exact(base, base) == 1.0


def test_a_clear_gain_is_significant_and_noise_is_not():
    base = mean_scores([0.0] * 30 + [100.0] * 10, binary=True)
    tuned = mean_scores([100.0] * 30 + [100.0] * 10, binary=True)
    iv = interval(base, tuned)
    assert iv["significant"] and 0 < iv["low"] <= 75 <= iv["high"] and iv["p"] < 1e-6
    coin = mean_scores([100.0 if i % 2 else 0.0 for i in range(20)], binary=True)
    flipped = mean_scores([0.0 if i % 2 else 100.0 for i in range(20)][:2] + coin.scores[2:], binary=True)
    small = interval(coin, flipped)
    assert not small["significant"] and small["low"] <= 0 <= small["high"] and small["p"] == 1.0


def test_the_bootstrap_pairs_items_and_recomputes_a_corpus_metric():
    scores = [float(i % 7) for i in range(50)]
    same = interval(mean_scores(scores), mean_scores(scores))
    assert same["low"] == same["high"] == 0 and not same["significant"]
    shifted = interval(mean_scores(scores), mean_scores([s + 1 for s in scores]))
    assert shifted["low"] == pytest.approx(1) and shifted["high"] == pytest.approx(1)  # paired: no spread
    corpus = PerItem(items=list(range(40)), corpus=lambda xs: float(len(set(xs))))  # a non-mean statistic
    assert interval(corpus, corpus)["low"] == 0


def test_text_evidence_averages_to_the_metrics():
    from sftlab.metrics.text import text_metrics

    preds = ["the cat sat", "a dog", "hello world", "42"]
    refs = ["the cat sat down", "a dog ran", "hello there world", "42"]
    metrics, evidence = text_metrics(preds, refs), text_evidence(preds, refs)
    assert set(evidence) == set(metrics)
    for key, ev in evidence.items():
        assert ev.value(list(range(len(preds)))) == pytest.approx(metrics[key])


def test_library_metrics_have_evidence_that_averages_to_them_and_gives_intervals():
    from sftlab.config import EvalConfig
    from sftlab.metrics.library import BertScore, Meteor, wordnet_dir
    from sftlab.metrics.text import Scorers, text_metrics
    from sftlab.model.load import INSTALL_ENCODER, encoder_dir

    if encoder_dir() is None or wordnet_dir() is None:
        pytest.skip(f"needs the bundled encoder ({INSTALL_ENCODER}) and WordNet (apt-get install wordnet-base)")
    scorers = Scorers(bertscore=BertScore(EvalConfig().bertscore_layer), meteor=Meteor())
    refs = ["the cat sat on the mat", "a dog ran in the park", "hello there world", "it is 42", "paris is in france"]
    base = ["a cat", "dogs", "hi", "it is 7", "rome"]
    tuned = ["the cat sat on a mat", "a dog ran in a park", "hello world", "it is 42", "paris is in france"]
    metrics, evidence = text_metrics(tuned, refs, scorers), text_evidence(tuned, refs, scorers)
    assert set(evidence) == set(metrics) >= {"bertscore_precision", "bertscore_recall", "bertscore_f1", "meteor"}
    for key, ev in evidence.items():
        assert ev.whole() == pytest.approx(metrics[key])
    before = text_evidence(base, refs, scorers)
    for key in ("bertscore_f1", "meteor"):
        iv = interval(before[key], evidence[key])
        assert iv["items"] == 5 and 0 < iv["low"] <= iv["high"]


def test_a_bare_sentence_encoder_still_adds_semantic_similarity():
    class Encoder:  # what callers passed before metrics.text.Scorers
        def similarities(self, predictions, references):
            return [1.0 if p == r else 0.5 for p, r in zip(predictions, references)]

        def similarity(self, predictions, references):
            return sum(self.similarities(predictions, references)) / len(predictions)

    from sftlab.metrics.text import text_metrics

    preds, refs = ["a", "b"], ["a", "c"]
    assert text_evidence(preds, refs, Encoder())["semantic_similarity"].scores == [100.0, 50.0]
    assert text_metrics(preds, refs, Encoder())["semantic_similarity"] == pytest.approx(75.0)


def test_example_losses_combine_to_the_eval_loss(tiny_model_dir, tmp_path):
    from conftest import tiny_config

    from sftlab.data.dataset import load_split
    from sftlab.evaluate.significance import token_mean
    from sftlab.metrics.perplexity import eval_loss, example_losses
    from sftlab.model.load import load_tokenizer
    from sftlab.model.loss import SupervisedLoss
    from sftlab.rundir import load_run

    cfg = tiny_config(tiny_model_dir, tmp_path / "x")
    tok = load_tokenizer(cfg.model)
    data = load_split(cfg.data, tok).dataset.select(range(6))
    module = SupervisedLoss(load_run(str(tiny_model_dir)).model)
    pairs = example_losses(module, data, tok.pad_token_id)
    assert len(pairs) == 6 and all(n > 0 for _, n in pairs)
    assert token_mean(pairs) == pytest.approx(eval_loss(module, data, 4, tok.pad_token_id)["eval_loss"], rel=1e-5)
