"""`sftlab data ...` as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FIXTURES, ROOT, write_jsonl

from sftlab.cli import main
from sftlab.errors import SftlabError


@pytest.fixture
def run_yaml(tmp_path, tmp_cache):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n"
        f"  train: [{{path: {FIXTURES / 'alpaca.jsonl'}}}, {{path: {FIXTURES / 'sharegpt.json'}}},"
        f" {{path: {FIXTURES / 'messages.jsonl'}}}]\n"
        "  max_length: 256\n"
    )
    return path


def test_tokenize_writes_guide_format(run_yaml, tmp_path, capsys, smol_tok):
    out = tmp_path / "tok.jsonl"
    assert main(["data", "tokenize", str(run_yaml), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7
    for row in rows:
        assert set(row) == {"input_ids", "labels"} and len(row["input_ids"]) == len(row["labels"])
        assert -100 in row["labels"] and any(x != -100 for x in row["labels"])
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [r["name"] for r in report] == ["alpaca.jsonl", "sharegpt.json", "messages.jsonl"]
    assert "wrote 7 examples" in capsys.readouterr().out


def test_inspect_marks_supervised_text_and_takes_overrides_anywhere(run_yaml, capsys, smol_tok):
    assert main(["data", "inspect", str(run_yaml), "--num", "2", "data.max_length=40", "--color", "never", "data.template=chatml"]) == 0
    out = capsys.readouterr().out
    assert "alpaca.jsonl" in out and "sharegpt.json" in out
    assert "[[2 + 3 = 5.<|im_end|>]]" in out
    assert "<|im_start|>user\nAdd the numbers." in out  # the prompt is shown, unmarked


@pytest.mark.parametrize("name", ["alpaca.jsonl", "sharegpt.json", "messages.jsonl"])
def test_inspect_a_data_file_directly(name, tmp_cache, capsys, smol_tok):
    assert main(["data", "inspect", str(FIXTURES / name), "--num", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert name in out and "[[" in out and "<|im_end|>]]" in out


def test_inspect_colour_on_a_terminal(run_yaml, capsys, smol_tok):
    assert main(["data", "inspect", str(run_yaml), "--num", "1", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" in out and "[[" not in out


def test_bad_file_message_names_the_line_and_exits_2(tmp_path, tmp_cache, capsys, smol_tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a"}, "{broken"])
    assert main(["data", "inspect", "--num", "0", str(FIXTURES / "run_template.yaml"), f"data.train=[{bad}]"]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:2: malformed JSON" in err and "Traceback" not in err


def test_bad_config_key_exits_2(run_yaml, capsys):
    assert main(["data", "inspect", str(run_yaml), "data.max_lenght=3"]) == 2
    assert "did you mean 'max_length'" in capsys.readouterr().err


def test_unrecognized_argument_is_a_usage_error(run_yaml):
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(run_yaml), "--nope"])


def test_config_keys_lists_every_section(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key in ("model.name", "data.overflow", "train.grad_accum", "lora.target_modules"):
        assert key in out


def test_console_script_end_to_end(tmp_path, smol_tok):
    """The installed entry point, in a fresh process, on the bundled quickstart config."""
    env = {**os.environ, "SFTLAB_CACHE": os.environ["SFTLAB_CACHE"]}
    proc = subprocess.run(
        [sys.executable, "-m", "sftlab", "data", "inspect", str(ROOT / "examples" / "quickstart.yaml"), "--num", "1",
         "data.cache=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "alpaca_tasks.jsonl" in proc.stdout and "messages_zh_identity.jsonl" in proc.stdout


@pytest.mark.parametrize("argv, compare, overrides", [
    (["eval", "RUN", "--compare", "data.eval=[x]"], "base", ["data.eval=[x]"]),  # an override, not a model
    (["eval", "RUN", "--compare", "other-model"], "other-model", []),
    (["eval", "RUN", "--compare"], "base", []),
    (["eval", "RUN", "eval.seed=2", "--compare", "data.eval=[x]"], "base", ["eval.seed=2", "data.eval=[x]"]),
    (["eval", "--compare", "data.eval=[x]", "RUN", "eval.seed=2"], "base", ["data.eval=[x]", "eval.seed=2"]),
    (["eval", "RUN"], None, []),
])  # fmt: skip
def test_eval_compare_takes_a_following_override_as_an_override(argv, compare, overrides):
    from sftlab.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.config, args.compare, args.overrides) == ("RUN", compare, overrides)


def test_inspection_config_takes_a_data_file_or_a_run_yaml(run_yaml):
    from sftlab.data.inspect import inspection_config

    cfg = inspection_config(str(FIXTURES / "alpaca.jsonl"), ["data.max_length=64"], "eval")
    assert [s.path for s in cfg.data.eval] == [str(FIXTURES / "alpaca.jsonl")] and cfg.data.max_length == 64
    cfg = inspection_config(str(run_yaml), [], "train")
    assert len(cfg.data.train) == 3 and cfg.data.max_length == 256


def test_generate_conversations_from_prompts_and_a_file_open_with_the_system_message(tmp_path):
    from sftlab.generate import gather_conversations

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "two", "expected": "2"}])
    conversations, expected = gather_conversations(["one"], str(prompts), "be brief")
    system = {"role": "system", "content": "be brief"}
    assert conversations == [[system, {"role": "user", "content": "one"}], [system, {"role": "user", "content": "two"}]]
    assert expected == [None, "2"]
    assert gather_conversations(["one"], None, None) == ([[{"role": "user", "content": "one"}]], [None])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "two", "expected": 2}])
    with pytest.raises(SftlabError, match=r"bad.jsonl:1: \"expected\" must be non-empty text"):
        gather_conversations([], str(bad), None)


def test_generate_marks_answers_right_or_wrong_and_counts_them(monkeypatch):
    from types import SimpleNamespace

    import sftlab.generate as generate

    assert generate.is_right("The capital is Ｏttawa.", "ottawa") and not generate.is_right("Toronto", "Ottawa")
    fake = {k: SimpleNamespace(model=None, tokenizer=None) for k in ("response", "base_response")}
    replies, lines = iter(["7,000 meters", "0.07 meters", "Ottawa", "Ottawa"]), []
    monkeypatch.setattr(generate, "generate_answers", lambda *a, **k: [next(replies)])
    rows = generate.answer_prompts(fake, [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                                   generate.Sampling(), say=lambda *a: lines.append(" ".join(map(str, a))),
                                   expected=["7,000", "Ottawa"])  # fmt: skip
    assert [(r["response_right"], r["base_response_right"]) for r in rows] == [(True, False), (True, True)]
    assert lines[-1] == "right: tuned 2/2, base 1/2" and "(wrong; expected '7,000')" in lines[2]


def test_train_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    from conftest import FIXTURES

    out = tmp_path / "cli-run"
    argv = ["train", str(FIXTURES / "run_template.yaml"), f"model.name={tiny_model_dir}", f"train.output_dir={out}",
            f"data.train=[{FIXTURES / 'train_small.jsonl'}]", "train.max_steps=2", "train.report_to=[]"]
    assert main(argv) == 0
    assert "completed: 2/2 steps" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
