"""predict/translate on files (sftlab.task.classification.predict_file, sftlab.task.seq2seq.translate_file):
their input reading, and translate printing when it writes no file. predict_file and translate_file
with --output run end to end in test_classify_seq2seq."""

import importlib.util
import json
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.config import load_config
from sftlab.errors import DataError
from sftlab.loop.train import train
from sftlab.task.classification import input_records

ROOT = Path(__file__).parents[1]


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


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory):
    """A seq2seq run of one step on a tiny random T5: enough to load and translate (not to translate well)."""
    spec = importlib.util.spec_from_file_location("make_translate", ROOT / "examples" / "translate" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
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
