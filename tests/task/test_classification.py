"""task: classification through the same loop: labels, class weights, head loss, metrics, predict."""

import json
import random
from pathlib import Path

import conftest
import pytest
import torch

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import DataError
from sftlab.loop.train import train
from sftlab.task.classification import input_records

ROOT = Path(__file__).parents[2]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _sentiment(n, seed, labels=("pos", "neg")):
    """Separable by keyword: every 'pos' text has a positive word, every 'neg' text a negative one."""
    rng = random.Random(seed)
    words = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "broken"], "neu": ["blue", "square", "tall"]}
    fill = ["the", "a", "phone", "room", "meal", "was", "is", "really", "today"]
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        text = rng.sample(fill, 3) + [rng.choice(words[label])] + rng.sample(fill, 2)
        rows.append({"text": " ".join(text), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return conftest.tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _cls_config(model_dir, out, train_file, eval_file, *overrides):
    base = ["task=classification", f"model.name={model_dir}", f"data.train=[{train_file}]", f"data.eval=[{eval_file}]",
            f"train.output_dir={out}", "data.max_length=32", "train.precision=fp32", "train.report_to=[]",
            "train.method=full", "train.batch_size=8", "train.max_steps=60", "train.lr=3e-3", "train.eval_steps=30"]  # fmt: skip
    return load_config(None, base + list(overrides))


def test_classification_learns_a_separable_set_and_predict_round_trips_labels(tmp_path, tiny_bert):
    train_file = _write(tmp_path / "train.jsonl", _sentiment(96, 0))
    eval_file = _write(tmp_path / "eval.jsonl", _sentiment(40, 1))
    summary = train(_cls_config(tiny_bert, tmp_path / "run", train_file, eval_file), say=lambda *a: None)
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["models"]["model"]["metrics"]
    assert metrics["eval_accuracy"] >= 90  # chance is 50
    assert (tmp_path / "run" / "eval" / "confusion.png").is_file()
    saved = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert saved == {"labels": ["neg", "pos"], "type": "str"}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}

    inputs = _write(tmp_path / "in.jsonl", [{"text": "the meal was great"}, {"text": "the phone is broken"}])
    assert main(["predict", str(tmp_path / "run"), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"]
    for p in preds:
        assert set(p["probs"]) == {"neg", "pos"} and abs(sum(p["probs"].values()) - 1) < 1e-4
    # `sftlab eval RUN` reloads the saved model and finds the same numbers
    assert main(["eval", str(tmp_path / "run"), "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["models"]["model"]["metrics"]
    assert again["eval_accuracy"] == metrics["eval_accuracy"]
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "confusion matrix" in (tmp_path / "run" / "report.html").read_text()


def test_integer_labels_stay_integers_and_lora_on_a_decoder_backbone_saves_its_head(tmp_path, tiny_model_dir):
    rows = [{"text": r["text"], "label": 1 if r["label"] == "pos" else 0} for r in _sentiment(48, 2)]
    train_file = _write(tmp_path / "train.jsonl", rows)
    cfg = _cls_config(tiny_model_dir, tmp_path / "run", train_file, train_file, "train.method=lora", "train.max_steps=4")
    train(cfg, say=lambda *a: None)
    run = tmp_path / "run"
    assert json.loads((run / "labels.json").read_text()) == {"labels": ["0", "1"], "type": "int"}
    from safetensors import safe_open

    with safe_open(run / "adapter_model.safetensors", "pt") as f:
        assert any("score" in k for k in f.keys())  # the new head trains and is saved with the adapter
    inputs = run / "in.txt"
    inputs.write_text("the meal was great\nthe phone is broken\n")
    assert main(["predict", str(run), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(p["label"] in (0, 1) and set(p["probs"]) == {"0", "1"} for p in preds)

    # the reloaded run classifies exactly as the model did at the end of training
    from sftlab.rundir import load_run
    from sftlab.task.classification import predict_probs

    loaded = load_run(str(run), "classification")
    model, tok = loaded.model, loaded.tokenizer
    probs = predict_probs(model, [{"input_ids": tok("the meal was great")["input_ids"]}], tok.pad_token_id)
    assert probs[0].tolist() == pytest.approx(list(preds[0]["probs"].values()), abs=1e-5)


def test_class_weights_balance_an_imbalanced_set_and_change_the_loss(tmp_path, tiny_bert):
    from sftlab.task.classification import Classification, ClassificationLoss, collate

    rows = _sentiment(40, 3, labels=("pos", "pos", "pos", "neg"))  # 30 pos, 10 neg
    train_file = _write(tmp_path / "train.jsonl", rows)
    cfg = _cls_config(tiny_bert, tmp_path / "run", train_file, train_file, "classification.class_weights=balanced")
    task = Classification(cfg)
    from sftlab.model.load import load_tokenizer

    tok = load_tokenizer(cfg.model)
    data, _, _ = task.load_data(tok, 0)
    assert task.weights.tolist() == pytest.approx([40 / (2 * 10), 40 / (2 * 30)])  # neg, pos
    lm = task.load_model("fp32", tok)
    batch = collate([dict(zip(data.column_names, v)) for v in zip(*(data[c] for c in data.column_names))][:8],
                    tok.pad_token_id)  # fmt: skip
    plain, weighted = ClassificationLoss(lm, None)(**batch), ClassificationLoss(lm, task.weights)(**batch)
    logits = lm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=task.weights, reduction="none")
    assert weighted.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)


def test_classification_metrics_by_hand():
    from sftlab.task.classification import classification_metrics

    gold, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    m = classification_metrics(gold, pred, 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    precision, recall = [1, 0.5, 0.5], [2 / 3, 0.5, 1]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["precision_macro"] == pytest.approx(100 * sum(precision) / 3)
    assert m["recall_macro"] == pytest.approx(100 * sum(recall) / 3)
    assert m["f1_macro"] == pytest.approx(100 * sum(f1) / 3)


def test_bad_labels_name_the_record(tmp_path, tiny_bert):
    train_file = _write(tmp_path / "train.jsonl", _sentiment(8, 0))
    unknown = _write(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    with pytest.raises(DataError, match=rf"{unknown}:2: label 'meh' is not a class of this run \(neg, pos\)"):
        train(_cls_config(tiny_bert, tmp_path / "a", train_file, unknown), say=lambda *a: None)
    missing = _write(tmp_path / "missing.jsonl", [{"text": "x", "label": "pos"}, {"text": "no label here"}])
    with pytest.raises(DataError, match=rf"{missing}:2: missing field 'label'"):
        train(_cls_config(tiny_bert, tmp_path / "b", missing, train_file), say=lambda *a: None)


def test_classification_holds_out_eval_split_when_no_eval_data_is_given(tmp_path, tiny_bert):
    train_file = _write(tmp_path / "train.jsonl", _sentiment(40, 4))
    cfg = _cls_config(tiny_bert, tmp_path / "run", train_file, train_file, "data.eval=[]", "data.eval_split=0.25",
                      "train.max_steps=2")  # fmt: skip
    summary = train(cfg, say=lambda *a: None)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["models"]["model"]["metrics"]
    assert summary["first_eval_loss"] is not None and metrics["eval_tokens"] == 10  # 25% of 40 examples
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["train"][0]["kept"] == 40


def test_input_records_reads_txt_lines_and_record_files(tmp_path):
    txt = tmp_path / "in.txt"
    txt.write_text("first\n\n  \nsecond\n", encoding="utf-8")
    assert input_records(str(txt), "source") == [{"source": "first"}, {"source": "second"}]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "text_pair": "b"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    rows = input_records(str(jsonl), "text", ("text_pair",))
    assert [(r["text"], r.get("text_pair")) for r in rows] == [("a", "b"), ("c", None)]


def test_input_records_errors_name_the_option(tmp_path):
    with pytest.raises(DataError, match=r"--input .*nope.txt: no such file"):
        input_records(str(tmp_path / "nope.txt"), "text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match=r"--input .*empty.txt: no lines"):
        input_records(str(empty), "text")
