"""Screening with a classifier: a tiny classification run trained here on a learnable rule (a marker word
means "harmful") drops the records it flags from `sftlab data clean`, with label, probability and counts."""

import json
import random
import shutil

import pytest
import torch
from conftest import write_jsonl

from sftlab.cli import main
from sftlab.curate.screen import Screen, Verdict, flagged_labels
from sftlab.errors import ConfigError, ModelError

MARKERS = ["poison", "explosive", "weapon"]
FILL = ["the", "garden", "recipe", "train", "morning", "letter", "river", "music", "paint", "window", "bread", "city"]


def _text(rng, harmful):
    """Five one-token words, one of them a marker when harmful: the same length either way, so that training's
    length-grouped batches mix both classes."""
    words = rng.sample(FILL, 5)
    if harmful:
        words[rng.randrange(5)] = rng.choice(MARKERS)
    return " ".join(words)


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    """A classification run (tiny random BERT, full training) that learned: a marker word -> harmful."""
    from conftest import tiny_bert

    from sftlab.config import load_config
    from sftlab.loop.train import train

    root = tmp_path_factory.mktemp("screen")
    tiny_bert(root / "bert", max_position_embeddings=64)
    rng = random.Random(0)
    rows = [{"text": _text(rng, i % 2 == 0), "label": "harmful" if i % 2 == 0 else "safe"} for i in range(96)]
    data = write_jsonl(root / "train.jsonl", rows)
    cfg = load_config(None, ["task=classification", f"model.name={root / 'bert'}", f"data.train=[{data}]",
                             f"train.output_dir={root / 'run'}", "data.max_length=16", "data.eval_split=0",
                             "train.precision=fp32", "train.report_to=[]", "train.method=full", "train.batch_size=8",
                             "train.max_steps=80", "train.lr=5e-3", "train.scheduler=constant"])  # fmt: skip
    train(cfg, say=lambda *a, **k: None)
    return root / "run"


@pytest.fixture(scope="module")
def screen(screen_run):
    return Screen.load(screen_run)


# 36 words with no marker and few repeated 3-grams (the repetition filter would drop a plain repeat)
LONG = " ".join(random.Random(5).sample(FILL, 12) + random.Random(6).sample(FILL, 12) + random.Random(7).sample(FILL, 12))


def _records(n=12, seed=1):
    """Alpaca records, every third with a marker word in the reply: the harmful ones."""
    rng = random.Random(seed)
    return [{"instruction": f"Write note {i}.", "output": _text(rng, i % 3 == 0)} for i in range(n)]


def _dialogue_texts(path):
    """What `data clean` scores: the user and assistant turns of each record."""
    from sftlab.curate.quality import dialogue_text
    from sftlab.data.formats import load_conversations

    return [dialogue_text(c) for c in load_conversations(str(path)).conversations]


def test_score_flags_the_marker_word_in_batches_without_grad(screen):
    texts = [r["output"] for r in _records()]
    seen = []
    hook = screen.model.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.training)))
    try:
        verdicts = screen.score(texts)
    finally:
        hook.remove()
    assert seen == [(False, False)]  # one batch of 12, no autograd graph, eval mode (no dropout)
    assert [v.flagged for v in verdicts] == [i % 3 == 0 for i in range(len(texts))]
    assert all(isinstance(v, Verdict) and v.label == "harmful" for v in verdicts)  # the one flagged label
    assert all(v.prob > 0.5 for v in verdicts if v.flagged) and all(v.prob < 0.5 for v in verdicts if not v.flagged)
    small = Screen(screen.model, screen.tokenizer, screen.labels, screen.flagged, batch_size=2)
    assert [v.prob for v in small.score(texts)] == pytest.approx([v.prob for v in verdicts], abs=1e-5)
    assert screen.score([]) == []
    assert screen.labels == ["harmful", "safe"] and screen.flagged == ["harmful"] and screen.max_length == 16


def test_threshold_decides_and_long_texts_are_cut_and_said_so(screen):
    texts = [r["output"] for r in _records()]
    probs = [v.prob for v in screen.score(texts)]
    for cut in (max(probs), sorted(probs)[-3]):  # a probability equal to the threshold flags
        strict = Screen(screen.model, screen.tokenizer, screen.labels, screen.flagged, threshold=cut, max_length=16)
        assert [v.flagged for v in strict.score(texts)] == [p >= cut for p in probs]
        assert 1 <= sum(p >= cut for p in probs) < 4  # fewer than the 4 harmful ones the default flags
    assert [v.truncated for v in screen.score([LONG, texts[0]])] == [True, False]  # 36 words > 16 tokens
    with pytest.raises(ConfigError, match="must be in"):
        Screen(screen.model, screen.tokenizer, screen.labels, screen.flagged, threshold=0)


def test_flagged_labels_by_name_or_explicitly():
    assert flagged_labels(["harmful", "safe"], None) == ["harmful"]
    assert flagged_labels(["0", "1"], None) == ["1"]
    assert flagged_labels(["Benign", "spam", "phishing"], None) == ["spam", "phishing"]
    assert flagged_labels(["NONE", "toxic"], None) == ["toxic"]
    assert flagged_labels(["neg", "pos"], ["neg"]) == ["neg"]
    for labels in (["neg", "pos"], ["safe", "ok"]):
        with pytest.raises(ConfigError, match="--screen-label"):
            flagged_labels(labels, None, "runs/x")
    with pytest.raises(ConfigError, match=r"--screen-label meh: not a label .*\(its labels: neg, pos\)"):
        flagged_labels(["neg", "pos"], ["meh"])


def _clean(tmp_path, screen_run, *extra, rows=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "data.jsonl", rows or _records())
    out = tmp_path / "out"
    assert main(["data", "clean", str(data), "--output", str(out), "--screen", str(screen_run), *extra]) == 0
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    kept = [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()]
    return kept, rejected, json.loads((out / "report.json").read_text()), json.loads((out / "manifest.json").read_text())


def test_clean_drops_what_the_screen_flags_with_label_probability_and_counts(tmp_path, screen_run, capsys):
    rows = _records()
    rows.append({"instruction": "Describe it.", "output": LONG})  # longer than the run's 16 tokens
    rows.append({"instruction": "Opinion?", "output": "As an AI language model, I can't share opinions."})
    kept, rejected, report, manifest = _clean(tmp_path, screen_run, rows=rows)
    screened = [r for r in rejected if r["reason"] == "screened"]
    assert [r["origin"].rsplit(":", 1)[1] for r in screened] == ["1", "4", "7", "10"]  # every third record
    for r in screened:
        assert r["label"] == "harmful" and 0.5 <= r["prob"] <= 1 and r["detail"].startswith("harmful ")
        assert any(m in r["messages"][-1]["content"] for m in MARKERS)
    assert not any(m in k["messages"][-1]["content"] for k in kept for m in MARKERS)
    assert {r["reason"] for r in rejected} == {"screened", "refusal or boilerplate"}  # the pattern list still works
    assert report["reasons"]["screened"] == 4
    # the refusal was dropped before screening: the classifier scored the 13 others
    assert {k: report["screen"][k] for k in ("scored", "flagged", "truncated", "max_length", "labels")} == {
        "scored": 13, "flagged": 4, "truncated": 1, "max_length": 16, "labels": ["harmful"]}  # fmt: skip
    assert manifest["counts"]["screen"]["flagged"] == 4
    assert manifest["settings"]["screen"]["threshold"] == 0.5 and "model.safetensors" in manifest["settings"]["screen"]["sha256"]
    printed = capsys.readouterr().out
    assert "screened" in printed and "13 scored" in printed and "1 cut to 16 tokens" in printed
    scores = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert all(s["screen_prob"] < 0.5 for s in scores)  # how close each kept record came


def test_clean_threshold_and_explicit_labels(tmp_path, screen_run, screen):
    texts = _dialogue_texts(write_jsonl(tmp_path / "probe.jsonl", _records()))
    probs = sorted(v.prob for v in screen.score(texts))
    threshold = (probs[-2] + probs[-3]) / 2  # between the 2nd and 3rd most harmful-looking records
    expected = sum(p >= threshold for p in probs)
    assert 1 <= expected < 4  # fewer than the 4 harmful ones the default threshold flags
    _, rejected, report, _ = _clean(tmp_path / "t", screen_run, "--screen-threshold", repr(threshold))
    assert len(rejected) == expected and all(r["prob"] >= threshold for r in rejected)
    assert report["screen"]["threshold"] == threshold
    kept, rejected, report, _ = _clean(tmp_path / "l", screen_run, "--screen-label", "safe")
    assert {r["label"] for r in rejected} == {"safe"} and len(rejected) == 8 and len(kept) == 4
    assert all(any(m in k["messages"][-1]["content"] for m in MARKERS) for k in kept)


def test_screen_errors_are_clear(tmp_path, screen_run, lora_run, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    args = ["data", "clean", str(data), "--output", str(tmp_path / "o")]
    assert main([*args, "--screen", str(lora_run)]) == 2
    assert f"{lora_run}: not a classification run (it is a causal_lm run)" in capsys.readouterr().err
    assert main([*args, "--screen", str(tmp_path)]) == 2
    assert "not a classification run (no config.yaml)" in capsys.readouterr().err
    assert main([*args, "--screen", str(screen_run), "--screen-label", "toxic"]) == 2
    assert "--screen-label toxic: not a label of this classifier (its labels: harmful, safe)" in capsys.readouterr().err
    assert main([*args, "--screen", str(screen_run), "--screen-threshold", "1.5"]) == 2
    assert "--screen-threshold 1.5: must be in (0, 1]" in capsys.readouterr().err
    assert main([*args, "--screen-label", "harmful"]) == 2
    assert "--screen-label: needs --screen RUN_DIR" in capsys.readouterr().err
    unnamed = shutil.copytree(screen_run, tmp_path / "unnamed")  # labels no name tells apart
    (unnamed / "labels.json").write_text(json.dumps({"labels": ["spam", "ham"], "type": "str"}))
    assert main([*args, "--screen", str(unnamed)]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which labels to flag from spam, ham" in err and "--screen-label LABEL" in err
    with pytest.raises(ModelError, match="task: classification"):
        Screen.load(lora_run)
