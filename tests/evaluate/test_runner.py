"""`sftlab eval` and in-training generation on the tiny model."""

import json

import pytest
import torch
from conftest import FIXTURES, ROOT, tiny_config, write_jsonl

from sftlab.cli import main
from sftlab.evaluate import benchmarks as B
from sftlab.evaluate.runner import prepare_inputs, run_eval, score_model
from sftlab.generate import Sampling, generate_answers
from sftlab.loop.train import train
from sftlab.rundir import load_run, read_metrics

EVAL = FIXTURES / "train_small.jsonl"
QUIET = dict(say=lambda *a, **k: None)


def _eval_cfg(tiny_model_dir, tmp_path, *overrides):
    return tiny_config(tiny_model_dir, tmp_path / "run", f"data.eval=[{EVAL}]", "eval.max_examples=5",
                       "eval.max_new_tokens=8", "eval.semantic=false", "eval.bertscore=false", "eval.meteor=false",
                       *overrides)  # fmt: skip


def test_perplexity_equals_an_independent_computation(tiny_model_dir, tmp_path):
    cfg = _eval_cfg(tiny_model_dir, tmp_path, "eval.max_examples=1")
    loaded = load_run(str(tiny_model_dir))
    inputs = prepare_inputs(cfg, loaded.tokenizer)
    metrics, _, _ = score_model(loaded.model, inputs, "model")
    total, count = 0.0, 0
    with torch.no_grad():
        for row in inputs.eval_data:  # plain transformers: mean loss over shifted labels, one example at a time
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += float(loaded.model(input_ids=ids, labels=labels.long()).loss) * n
            count += n
    assert metrics["eval/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["eval/ppl"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_batched_left_padded_generation_equals_one_at_a_time(lively_model_dir):
    loaded = load_run(str(lively_model_dir))
    convs = [[{"role": "user", "content": c}] for c in ("hi", "a much longer question about rivers and stone", "ok?")]
    sampling = Sampling(max_new_tokens=12)
    batched = generate_answers(loaded.model, loaded.tokenizer, convs, sampling, batch_size=3)
    single = [generate_answers(loaded.model, loaded.tokenizer, [c], sampling, batch_size=1)[0] for c in convs]
    assert batched == single and len(set(batched)) == 3 and all(batched)


def test_choice_logprobs_equal_a_full_forward(tiny_model_dir, tmp_path):
    loaded, tok = load_run(str(tiny_model_dir)), None
    tok = loaded.tokenizer
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Sky colour?", "choices": ["blue", "green sea", "red"], "answer": 0}])
    items = B.load_benchmark(B.TaskSpec(str(path), "multiple_choice"))
    scores = B.choice_logprobs(loaded.model, tok, items, batch_size=2)[0]
    prompt = tok.apply_chat_template(items[0].messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)
    for choice, score in zip(items[0].choices, scores):
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([prompt + cont])).logits[0], -1)
        expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-4)


def test_eval_cli_compares_with_the_base_and_writes_metrics_and_samples(tiny_model_dir, tmp_path, capsys):
    cfg = _eval_cfg(tiny_model_dir, tmp_path, "train.method=lora")
    train(cfg, **QUIET)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}?", "choices": ["yes", "no"], "answer": i % 2} for i in range(4)])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "#### 4"}])
    run = tmp_path / "run"
    overrides = [f"eval.tasks=[{{path: {mc}, type: multiple_choice}}, {{path: {gsm}, type: exact_match, name: arith}}]"]
    overrides += ["eval.bertscore=true", "eval.meteor=true"] if _library_metrics() else []
    assert main(["eval", str(run), "--compare", *overrides]) == 0
    record = json.loads((run / "eval" / "metrics.json").read_text())
    tuned, base = record["models"]["model"]["metrics"], record["models"]["base"]["metrics"]
    assert record["models"]["base"]["source"] == str(tiny_model_dir)
    for key in ("eval/loss", "eval/ppl", "eval/bleu", "eval/chrf", "eval/rouge1", "eval/rouge2", "eval/rougeL",
                "eval/exact_match", "mc/accuracy", "mc/accuracy_norm", "arith/exact_match"):
        assert key in tuned and key in base
        assert record["delta"][key] == pytest.approx(tuned[key] - base[key])
    assert tuned["eval/loss"] != base["eval/loss"]  # the adapter changed the model
    intervals = record["intervals"]
    assert {"mc/accuracy", "mc/accuracy_norm", "eval/bleu", "eval/rougeL", "eval/exact_match"} <= set(intervals)
    loss = intervals["eval/loss"]  # examples resampled: the observed loss delta lies inside
    assert loss["low"] <= record["delta"]["eval/loss"] <= loss["high"] and "p" not in loss
    for iv in intervals.values():
        assert iv["low"] is None or iv["low"] <= iv["high"]
    assert "p" in intervals["mc/accuracy"] and "p" not in intervals["eval/rougeL"]
    if _library_metrics():  # BERTScore and METEOR by their libraries, named with what they ran on
        assert {"eval/bertscore_f1", "eval/meteor"} <= set(tuned) & set(base) & set(intervals)
        assert record["bertscore"]["layer"] == 6 and "all-MiniLM-L6-v2" in record["bertscore"]["model"]
        assert record["meteor"]["wordnet"]
    rows = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["data.eval"] * 5 + ["mc"] * 4 + ["arith"]
    assert all("answer" in r and "base_answer" in r and "reference" in r for r in rows)
    out = capsys.readouterr().out
    assert "base" in out and "tuned" in out and "eval/loss" in out and "95% interval" in out


def test_eval_of_a_config_with_only_model_and_tasks(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": 4}])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\neval:\n  tasks: [{{path: gsm.jsonl, type: exact_match}}]\n"
                   "  max_new_tokens: 4\n")  # fmt: skip
    assert main(["eval", str(cfg), "--output", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(record["models"]["model"]["metrics"]) == ["gsm/exact_match"]


def test_eval_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\n")
    assert main(["eval", str(cfg)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("train: {max_steps: 1}\n")
    assert main(["eval", str(tmp_path / "half")]) == 2
    assert "no final model" in capsys.readouterr().err


def test_generate_every_logs_answers_and_leaves_training_unchanged(tiny_model_dir, tmp_path):
    with_gen = _eval_cfg(tiny_model_dir, tmp_path / "a", "eval.generate_every=3", "eval.generate_examples=2")
    without = _eval_cfg(tiny_model_dir, tmp_path / "b")
    train(with_gen, **QUIET)
    train(without, **QUIET)
    a, b = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [m.get("loss") for m in a] == [m.get("loss") for m in b]  # bit-exact: generation draws no randomness
    assert [m["step"] for m in a if "gen_bleu" in m] == [3, 6]
    assert all({"gen_chrf", "gen_rougeL", "gen_exact_match"} <= set(m) for m in a if "gen_bleu" in m)
    gens = [json.loads(line) for line in (tmp_path / "a" / "run" / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [3, 3, 6, 6] and all({"prompt", "reference", "answer"} <= set(g) for g in gens)


def test_quickstart_yaml_tasks_exist():
    from sftlab.config import load_config

    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    assert [t.type for t in cfg.eval.tasks] == ["multiple_choice", "exact_match", "code"]
    for spec in cfg.eval.tasks:
        assert B.load_benchmark(spec)


def test_eval_of_a_bf16_run_computes_as_trained(lively_model_dir, tmp_path):
    """A LoRA run trained in bf16 (a bf16 base under bf16 autocast, training's attention kernel):
    `sftlab eval` reads the same eval loss; in fp32 the same weights read differently."""
    out = tmp_path / "bf16-run"
    cfg = tiny_config(lively_model_dir, out, "train.method=lora", "train.precision=bf16", f"data.eval=[{EVAL}]")
    train(cfg, **QUIET)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compute"]["precision"] == "bf16" and summary["compute"]["autocast"] == "bf16"
    overrides = ["eval.max_examples=1", "eval.max_new_tokens=2", "eval.semantic=false", "eval.bertscore=false",
                 "eval.meteor=false"]
    record = run_eval(str(out), overrides, output=str(tmp_path / "e1"), **QUIET)
    assert record["compute"] == summary["compute"]
    fp32 = run_eval(str(out), overrides, output=str(tmp_path / "e2"), precision="fp32", **QUIET)
    trained, as_trained, in_fp32 = (summary["final_eval_loss"], record["models"]["model"]["metrics"]["eval/loss"],
                                    fp32["models"]["model"]["metrics"]["eval/loss"])  # fmt: skip
    assert as_trained == pytest.approx(trained, rel=1e-5) and in_fp32 != pytest.approx(trained, rel=1e-5)
    from sftlab.export.merge import merge
    from sftlab.rundir import read_compute

    merge(str(out), str(tmp_path / "merged"))  # carries the run's summary, but is a model the run never computed
    assert read_compute(out).precision == "bf16" and read_compute(tmp_path / "merged") is None


def test_eval_names_the_code_sandbox_it_ran_in(tiny_model_dir, tmp_path, capsys):
    from sftlab.evaluate.sandbox import isolation

    first = (ROOT / "examples" / "tasks" / "humaneval_mini.jsonl").read_text().splitlines()[0]
    (tmp_path / "code.jsonl").write_text(first + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\neval:\n  tasks: [{{path: code.jsonl, type: code}}]\n"
                   "  max_new_tokens: 4\n")  # fmt: skip
    assert main(["eval", str(cfg), "--output", str(tmp_path / "out")]) == 0
    assert f"code sandbox: {isolation().description}" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["sandbox"] == isolation().name


def _library_metrics() -> bool:
    from sftlab.evaluate.embedding import encoder_dir
    from sftlab.metrics.library import wordnet_dir

    return encoder_dir() is not None and wordnet_dir() is not None
