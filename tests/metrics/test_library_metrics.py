"""BERTScore and METEOR: equal to bert-score's and nltk's own results on the same inputs, plus sanity checks.
They skip, saying why, where the bundled encoder or WordNet is missing (CI has both)."""

import pytest

from sftlab.config import EvalConfig
from sftlab.errors import ConfigError
from sftlab.metrics import library as L
from sftlab.model.load import INSTALL_ENCODER, encoder_dir

CANDS = ["A man is playing a guitar.", "The cat sat on the mat.", "It is 3.14, isn't it?", "Paris is in France."]
REFS = ["Someone plays the guitar.", "the cat is on the mat", "It's 3.14.", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def bertscore():
    if encoder_dir() is None:
        pytest.skip(f"the bundled encoder is not installed: {INSTALL_ENCODER}")
    return L.BertScore(EvalConfig().bertscore_layer)


@pytest.fixture(scope="module")
def meteor():
    root = L.wordnet_dir()
    if root is None:
        pytest.skip(f"WordNet is not installed: {L.INSTALL_WORDNET}")
    return L.Meteor(root)


def test_bertscore_equals_bert_score_itself(bertscore):
    import bert_score

    ours = bertscore.scores(CANDS, REFS)
    theirs = bert_score.score(CANDS, REFS, model_type=str(encoder_dir()), num_layers=bertscore.layer)
    for key, values in zip(L.BERTSCORE_KEYS, theirs):
        assert ours[key] == pytest.approx([100 * v for v in values.tolist()], abs=1e-4)


def test_bertscore_sanity(bertscore):
    same = bertscore.scores(["The weather is lovely today."], ["The weather is lovely today."])
    assert all(v[0] == pytest.approx(100.0, abs=1e-3) for v in same.values())
    close, far = bertscore.scores(["A man is playing a guitar."] * 2, ["Someone plays the guitar.", "The stock market fell."])["bertscore_f1"]  # fmt: skip
    assert close > far + 20


def test_an_empty_answer_scores_zero_and_the_others_as_alone(bertscore):
    # bert-score itself fails on "" under transformers 5 (it scored it 0 before); the other pairs are unaffected.
    out = bertscore.scores(["", CANDS[0], "   "], ["a reference", REFS[0], REFS[1]])
    alone = bertscore.scores(CANDS[:1], REFS[:1])
    for key in L.BERTSCORE_KEYS:
        assert out[key][0] == out[key][2] == 0.0
        assert out[key][1] == pytest.approx(alone[key][0], abs=1e-4)
    assert bertscore.scores([], []) == {key: [] for key in L.BERTSCORE_KEYS}


def test_bertscore_names_its_model_and_layer(bertscore):
    record = bertscore.record()
    assert (
        record["model"] == "sentence-transformers/all-MiniLM-L6-v2" and record["layer"] == EvalConfig().bertscore_layer
    )
    assert record["idf"] is False and record["rescaled"] is False and record["library"].startswith("bert-score ")


@pytest.mark.parametrize("layer", [7, -1, True, "6"])
def test_a_layer_the_encoder_lacks_is_a_config_error(layer):
    if encoder_dir() is None:
        pytest.skip(f"the bundled encoder is not installed: {INSTALL_ENCODER}")
    with pytest.raises(ConfigError, match="eval.bertscore_layer"):
        L.BertScore(layer)


def test_meteor_tokens():
    assert L.meteor_tokens("It's 3.14, isn't it? Yes: 1,000!") == ["It's", "3.14", "isn't", "it", "Yes", "1,000"]
    assert L.meteor_tokens("我爱北京。OK") == ["我", "爱", "北", "京", "OK"]
    assert L.meteor_tokens("  ...  ") == []


def test_meteor_equals_nltk_itself(meteor):
    from nltk.translate.meteor_score import meteor_score

    expected = [100 * meteor_score([L.meteor_tokens(r)], L.meteor_tokens(c), wordnet=meteor.wordnet)
                for c, r in zip(CANDS, REFS)]  # fmt: skip
    assert meteor.scores(CANDS, REFS) == pytest.approx(expected)
    assert all(0 < s < 100 for s in expected)


def test_meteor_sanity(meteor):
    # Identical 6 words: one chunk, so the score is 1 minus the fragmentation penalty 0.5 * (1/6)^3.
    assert meteor.scores(["the cat sat on the mat"], ["The cat sat on the mat."]) == pytest.approx(
        [100 * (1 - 0.5 / 216)]
    )
    # A WordNet synonym: 1 match in 1 chunk. nltk looks synonyms up after its stemming stage, on the Porter stems
    # of the words left over, so "car" finds "auto" but "automobile" (stem "automobil") finds nothing.
    assert meteor.scores(["car", "automobile"], ["auto", "car"]) == pytest.approx([50.0, 0.0])
    close, far = meteor.scores(["He drove a new car"] * 2, ["He drives a new auto", "Stocks fell sharply today"])
    assert close > far and far == 0.0
    assert meteor.scores(["", "words"], ["words", ""]) == [0.0, 0.0]


def test_wordnet_from_debian_files_has_the_right_lexicographer_names(meteor):
    # Debian leaves out `lexnames`; ours must number the files as WordNet's data files do.
    wn = meteor.wordnet
    assert wn.synset("dog.n.01").lexname() == "noun.animal" and wn.synset("run.v.01").lexname() == "verb.motion"
    assert wn.synset("car.n.01").lexname() == "noun.artifact" and meteor.record()["wordnet"] == "3.0"


def test_wordnet_dir_order_and_a_bad_override(tmp_path, monkeypatch):
    monkeypatch.setenv(L.WORDNET_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="SFTLAB_WORDNET"):
        L.wordnet_dir()
    for name in ("data.noun", "index.noun"):
        (tmp_path / name).write_text("")
    assert L.wordnet_dir() == tmp_path
    monkeypatch.delenv(L.WORDNET_ENV)
    monkeypatch.setattr(L, "DEBIAN_WORDNET", tmp_path / "absent")
    import nltk

    def missing(name):
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", missing)
    assert L.wordnet_dir() is None


def test_missing_wordnet_or_encoder_is_a_one_line_note(monkeypatch):
    from sftlab.evaluate import embedding as E

    notes = []
    monkeypatch.setattr(E, "wordnet_dir", lambda: None)
    monkeypatch.setattr(E, "encoder_dir", lambda: None)
    scorers = E.load_scorers(EvalConfig(), notes.append)
    assert scorers.semantic is scorers.bertscore is scorers.meteor is None and scorers.record() == {}
    assert notes == [f"note: semantic similarity and BERTScore skipped: the encoder is not installed ({INSTALL_ENCODER})",
                     "note: METEOR skipped: WordNet is not installed (apt-get install wordnet-base, or set SFTLAB_WORDNET)"]  # fmt: skip
    notes.clear()
    off = EvalConfig(semantic=False, bertscore=False, meteor=False)
    assert E.load_scorers(off, notes.append).record() == {} and notes == []
