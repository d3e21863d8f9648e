"""Task files, pass@k and the code sandbox."""

import json
import math
from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl

from sftlab.config import TaskSpec, load_config
from sftlab.errors import ConfigError, DataError
from sftlab.evaluate import benchmarks as B
from sftlab.evaluate.sandbox import run_program

TASKS = ROOT / "examples" / "tasks"


@pytest.mark.parametrize("n, c, k", [(3, 2, 1), (3, 2, 2), (5, 1, 2), (10, 3, 5), (4, 0, 1), (4, 4, 3)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert B.pass_at_k(n, c, k) == pytest.approx(expected)


def test_bundled_task_files_load():
    assert len(B.load_benchmark(TaskSpec(str(TASKS / "mmlu_mini.jsonl"), "multiple_choice"))) == 20
    gsm = B.load_benchmark(TaskSpec(str(TASKS / "gsm_mini.jsonl"), "exact_match", limit=3))
    assert len(gsm) == 3 and gsm[0].reference.endswith("#### 15")
    code = B.load_benchmark(TaskSpec(str(TASKS / "humaneval_mini.jsonl"), "code"))
    assert code[0].code["entry_point"] == "add" and "```python" in code[0].messages[0]["content"]


def _code_items():
    return B.load_benchmark(TaskSpec(str(TASKS / "humaneval_mini.jsonl"), "code"))[:3]


def test_pass_at_k_on_known_correct_and_wrong_solutions():
    items = _code_items()  # add, is_even, reverse_string
    right_body = [json.loads(line)["canonical_solution"] for line in (TASKS / "humaneval_mini.jsonl").read_text().splitlines()]
    fenced = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    replies = [
        [right_body[0], "    return a - b\n", fenced],  # 2 of 3 right
        ["    return n % 2 == 1\n", "```python\ndef is_even(n):\n    return False\n```", "    return True\n"],  # 0 of 3
        [right_body[2]] * 3,  # 3 of 3
    ]
    scores, statuses = B.code_scores(items, replies, [1, 2], timeout=10, memory_mb=512)
    assert statuses[0] == ["passed", "failed", "passed"] and statuses[2] == ["passed"] * 3
    assert scores["pass@1"] == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert scores["pass@2"] == pytest.approx(100 * (1 + 0 + 1) / 3)


def test_runaway_candidates_are_stopped_and_counted_as_failed():
    items = _code_items()[:1]
    replies = [["    while True:\n        pass\n", "    x = bytearray(8 << 30)\n    return a + b\n",
                "    return sum([a, b])\n"]]  # fmt: skip
    scores, statuses = B.code_scores(items, replies, [1], timeout=2, memory_mb=256)
    assert statuses[0][0] == "timeout" and statuses[0][1] == "failed" and statuses[0][2] == "passed"
    assert scores["pass@1"] == pytest.approx(100 / 3)


def test_sandbox_refuses_writes_outside_its_temp_dir_network_and_subprocesses(tmp_path):
    target = tmp_path / "escaped.txt"
    out = run_program(f"open({str(target)!r}, 'w').write('x')", timeout=5)
    assert not out.passed and "outside the temporary directory" in out.detail and not target.exists()
    assert not run_program(f"import os; os.remove({str(tmp_path)!r})", timeout=5).passed
    assert run_program("open('inside.txt', 'w').write('ok'); assert open('inside.txt').read() == 'ok'", timeout=5).passed
    assert not run_program("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", timeout=5).passed
    assert not run_program(f"import subprocess; subprocess.run(['touch', {str(target)!r}])", timeout=5).passed
    assert not target.exists()


def test_build_program_takes_a_whole_function_or_a_body():
    item = _code_items()[0].code
    whole = B.build_program(item, "```python\ndef add(a, b):\n    return a + b\n```")
    assert "def add(a, b)" in whole and whole.rstrip().endswith("check(add)")
    body = B.build_program(item, "    return a + b\n")
    assert body.startswith(item["prompt"]) and run_program(body).passed


@pytest.mark.parametrize("kind, line, message", [
    ("multiple_choice", "{not json", "malformed JSON"),
    ("multiple_choice", {"question": "q", "choices": ["a"], "answer": 0}, "at least two"),
    ("multiple_choice", {"question": "q", "choices": ["a", "b"], "answer": "C"}, "'answer' 'C' is not"),
    ("multiple_choice", {"choices": ["a", "b"], "answer": 0}, "missing or empty field 'question'"),
    ("exact_match", {"question": "q", "answer": "no number"}, "final number"),
    ("code", {"prompt": "def f():\n", "test": "def check(c): pass"}, "'entry_point'"),
    ("code", {"prompt": "def f():\n", "test": "t", "entry_point": "g"}, "does not define the entry point g"),
    ("generation", {"prompt": "p"}, "missing field 'reference'"),
    ("generation", {"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
])  # fmt: skip
def test_malformed_task_files_name_file_and_line(tmp_path, kind, line, message):
    path = write_jsonl(tmp_path / "task.jsonl", [{"question": "ok?", "choices": ["a", "b"], "answer": 0,
                                                  "prompt": "def g():\n", "test": "t", "entry_point": "g",
                                                  "reference": "r"} if kind != "exact_match"
                                                 else {"question": "ok", "answer": "#### 1"}, line])  # fmt: skip
    with pytest.raises(DataError) as err:
        B.load_benchmark(TaskSpec(str(path), kind))
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_empty_or_missing_task_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no task items"):
        B.load_benchmark(TaskSpec(str(tmp_path / "empty.jsonl"), "generation"))
    with pytest.raises(DataError, match="not found"):
        B.load_benchmark(TaskSpec(str(tmp_path / "missing.jsonl"), "generation"))


def test_task_config_keys_are_checked_and_paths_rebased(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("model: {name: x}\neval:\n  tasks:\n    - {path: t/mc.jsonl, type: multiple_choice}\n")
    cfg = load_config(cfg_file)
    assert Path(cfg.eval.tasks[0].path) == tmp_path / "t" / "mc.jsonl" and cfg.eval.tasks[0].label == "mc"
    with pytest.raises(ConfigError, match="did you mean 'multiple_choice'"):
        load_config(None, ["eval.tasks=[{path: a.jsonl, type: multiple_choise}]"])
    with pytest.raises(ConfigError, match="a task file needs its type"):
        load_config(None, ["eval.tasks=[{path: a.jsonl}]"])
    with pytest.raises(ConfigError, match="eval.num_samples"):
        load_config(None, ["eval.pass_k=[1, 5]"])
