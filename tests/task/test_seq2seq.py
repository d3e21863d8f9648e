"""task: seq2seq through the same loop: target masks, the decoder loss, BLEU, translate."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import DataError
from sftlab.loop.train import train

ROOT = Path(__file__).parents[2]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _make_data_module():
    spec = importlib.util.spec_from_file_location("make_translate", ROOT / "examples" / "translate" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_rows(n, seed):
    rng = random.Random(seed)
    letters = "abcdefgh"
    return [{"source": " ".join(s), "target": " ".join(s)} for s in
            (rng.sample(letters, rng.randint(2, 5)) for _ in range(n))]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-t5")
    texts = [r["source"] for r in _copy_rows(200, 0)]
    _make_data_module().build_model_dir(texts, out, d_model=32, layers=2, heads=2, vocab_size=60)
    return out


def _s2s_config(model_dir, out, train_file, eval_file, *overrides):
    base = ["task=seq2seq", f"model.name={model_dir}", "model.init=random", f"data.train=[{train_file}]",
            f"data.eval=[{eval_file}]", f"train.output_dir={out}", "data.max_length=16", "train.precision=fp32",
            "train.report_to=[]", "train.method=full", "train.batch_size=16", "train.max_steps=120", "train.lr=5e-3",
            "seq2seq.max_target_length=16"]  # fmt: skip
    return load_config(None, base + list(overrides))


def test_seq2seq_labels_mask_padding_and_the_loss_is_the_models_own(tiny_t5):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from sftlab.task.seq2seq import Seq2SeqLoss, collate

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    rows = [{"input_ids": tok("a b c")["input_ids"], "labels": tok(text_target="a b c d e")["input_ids"]},
            {"input_ids": tok("d")["input_ids"], "labels": tok(text_target="d")["input_ids"]}]  # fmt: skip
    batch = collate(rows, tok.pad_token_id)
    assert (batch["labels"][1, len(rows[1]["labels"]) :] == -100).all() and batch["labels"][1, -1] == -100
    assert rows[0]["labels"][-1] == tok.eos_token_id  # the target ends in EOS, which carries loss
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config.from_pretrained(tiny_t5)).eval()
    ours = Seq2SeqLoss(model)(**batch)
    supervised = int((batch["labels"] != -100).sum())
    theirs = model(**batch).loss  # HF: mean over non-ignored target tokens
    assert ours.item() == pytest.approx(theirs.item() * supervised, rel=1e-5)


def test_seq2seq_learns_a_copy_task_and_bleu_is_sacrebleus(tmp_path, tiny_t5):
    import sacrebleu

    train_file = _write(tmp_path / "train.jsonl", _copy_rows(320, 1))
    eval_file = _write(tmp_path / "eval.jsonl", _copy_rows(24, 2))
    summary = train(_s2s_config(tiny_t5, tmp_path / "run", train_file, eval_file), say=lambda *a: None)
    assert summary["final_eval_loss"] < 0.5 * summary["first_eval_loss"]
    samples = [json.loads(line) for line in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["models"]["model"]["metrics"]
    expected = sacrebleu.corpus_bleu([s["answer"] for s in samples], [[s["reference"] for s in samples]]).score
    assert metrics["eval_bleu"] == pytest.approx(expected)
    out = tmp_path / "t.jsonl"
    assert main(["translate", str(tmp_path / "run"), "--input", str(eval_file), "--output", str(out)]) == 0
    translations = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["translation"] for t in translations] == [s["answer"] for s in samples]


def test_seq2seq_bad_records_name_the_line(tmp_path, tiny_t5):
    bad = _write(tmp_path / "bad.jsonl", [{"source": "a b", "target": "a b"}, {"source": "c"}])
    with pytest.raises(DataError, match=rf"{bad}:2: missing field 'target'"):
        train(_s2s_config(tiny_t5, tmp_path / "run", bad, bad), say=lambda *a: None)


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory):
    """A seq2seq run of one step on a tiny random T5: enough to load and translate (not to translate well)."""
    make_data = _make_data_module()
    root = tmp_path_factory.mktemp("s2s")
    rows = [{"source": s, "target": s} for s in ("a b", "c d e", "f g", "h a b c")]
    make_data.build_model_dir([r["source"] for r in rows], root / "model", d_model=32, layers=2, heads=2, vocab_size=60)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["task=seq2seq", f"model.name={root / 'model'}", "model.init=random",
                             f"data.train=[{data}]", f"data.eval=[{data}]", f"train.output_dir={root / 'run'}",
                             "data.max_length=16",
                             "seq2seq.max_target_length=8", "train.precision=fp32", "train.report_to=[]",
                             "train.method=full", "train.batch_size=4", "train.max_steps=1"])  # fmt: skip
    train(cfg, say=lambda *a: None)
    return root / "run"


def test_translate_file_returns_what_it_writes_and_the_cli_prints_without_output(s2s_run, tmp_path, capsys):
    from sftlab.task.seq2seq import translate_file

    inputs = tmp_path / "in.txt"
    inputs.write_text("a b\nc d e\n")
    out = tmp_path / "t.jsonl"
    hyps = translate_file(str(s2s_run), str(inputs), str(out), max_new_tokens=4)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"source": "a b", "translation": hyps[0]}, {"source": "c d e", "translation": hyps[1]}]  # fmt: skip
    assert translate_file(str(s2s_run), str(inputs), None, max_new_tokens=4) == hyps  # greedy: the same again
    capsys.readouterr()
    assert main(["translate", str(s2s_run), "--input", str(inputs), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "\n".join(hyps) + "\n"


def test_predict_on_a_seq2seq_run_is_refused(s2s_run, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("a b\n")
    assert main(["predict", str(s2s_run), "--input", str(inputs), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "not a classification run (it is a seq2seq run)" in capsys.readouterr().err
