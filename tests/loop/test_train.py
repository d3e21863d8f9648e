"""The training loop: invariance (docs/correctness.md rule 3), exact resume (rule 6), eval loss, outputs."""

import json

import pytest
import torch
from conftest import FIXTURES, tiny_config
from helpers import interrupt_during_step, losses
from safetensors.torch import load_file

import sftlab.loop.train as train_mod
from sftlab.errors import SftlabError
from sftlab.loop.train import train
from sftlab.rundir import read_metrics

QUIET = {"say": lambda *a, **k: None}


def final_weights(out, method):
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    return load_file(out / name)


def assert_equal_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def invariance_runs(tiny_model_dir, tmp_path, method):
    a = tiny_config(tiny_model_dir, tmp_path / "a", f"train.method={method}", "train.batch_size=8", "train.grad_accum=1")
    b = tiny_config(tiny_model_dir, tmp_path / "b", f"train.method={method}", "train.batch_size=1", "train.grad_accum=8")
    train(a, **QUIET)
    train(b, **QUIET)
    return losses(tmp_path / "a"), losses(tmp_path / "b"), *(final_weights(tmp_path / x, method) for x in "ab")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_batch8_accum1_equals_batch1_accum8(tiny_model_dir, tmp_path, method):
    la, lb, wa, wb = invariance_runs(tiny_model_dir, tmp_path, method)
    assert len(la) == 6
    assert la == pytest.approx(lb, rel=1e-5)  # every step's loss, variable-length data
    diff = sum(float((wa[k] - wb[k]).norm() ** 2) for k in wa) ** 0.5
    assert diff / sum(float(w.norm() ** 2) for w in wa.values()) ** 0.5 < 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_invariance_is_exact_up_to_rounding(tiny_model_dir, tmp_path, method, monkeypatch):
    """In float64 every tensor's update agrees to 1e-9: the fp32 gap above is summation order that
    Adam's per-element normalization carries forward, not a normalization error."""
    import sftlab.model.load as models

    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda cfg, dtype=None: real(cfg).double())
    la, lb, wa, wb = invariance_runs(tiny_model_dir, tmp_path, method)
    assert la == pytest.approx(lb, rel=1e-12)
    init = load_file(tiny_model_dir / "model.safetensors")
    for k in wa:
        update = wa[k] - init[k].double() if k in init else wa[k]  # LoRA weights: the whole tensor is learned
        assert float((wa[k] - wb[k]).norm() / update.norm()) < 1e-9, k


def test_invariance_is_not_trivial(tiny_model_dir, tmp_path):
    """Control: a per-micro-batch mean (the common bug) would give a different loss for the same step."""
    from sftlab.data.batching import collate, plan_epoch, rows, supervised_count
    from sftlab.data.dataset import load_split
    from sftlab.model.load import load_model, load_tokenizer
    from sftlab.model.loss import loss_sum

    cfg = tiny_config(tiny_model_dir, tmp_path / "x")
    tok = load_tokenizer(cfg.model)
    data = load_split(cfg.data, tok).dataset
    model = load_model(cfg.model)
    (step, *_) = plan_epoch([len(x) for x in data["input_ids"]], 1, 8, 42, 0)
    batches = [collate(rows(data, idx), tok.pad_token_id) for idx in step]
    with torch.no_grad():
        sums = [loss_sum(model, b).item() for b in batches]
    counts = [supervised_count(b) for b in batches]
    exact = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(counts)
    assert abs(exact - mean_of_means) / exact > 1e-4  # 10x the invariance tolerance: the test would catch it


def test_training_runs_in_train_mode_so_dropout_is_live(tiny_model_dir, tmp_path, monkeypatch):
    modes = []
    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda run, mb, st: (modes.append(run.lm.training), real_step(run, mb, st))[1])
    runs = []
    for dropout in (0.0, 0.3):  # same seed and init: only live dropout can make the losses differ
        out = tmp_path / f"d{dropout}"
        train(tiny_config(tiny_model_dir, out, f"lora.dropout={dropout}", "train.max_steps=3"), **QUIET)
        runs.append(losses(out))
    assert all(modes)
    assert runs[0][0] == runs[1][0]  # step 1: LoRA B is still zero, so dropout cannot matter yet
    assert runs[0][2] != runs[1][2]


# adalora: its rank allocator's state is checkpointed too; full-bf16: fp32 master weights over a bf16 model
@pytest.mark.parametrize("method", ["lora", "adalora", "full-bf16"])
def test_resume_after_interrupt_reproduces_the_run(tiny_model_dir, tmp_path, monkeypatch, method):
    extra = ["train.method=full", "train.precision=bf16"] if method == "full-bf16" else [f"train.method={method}"]
    extra += ["lora.dropout=0.1", "train.max_steps=8", "train.eval_steps=4"]
    full = tiny_config(tiny_model_dir, tmp_path / "full", *extra, "data.eval=[" + str(FIXTURES / "train_small.jsonl") + "]")
    train(full, **QUIET)

    cut = tiny_config(tiny_model_dir, tmp_path / "cut", *extra, "data.eval=[" + str(FIXTURES / "train_small.jsonl") + "]")
    interrupt_during_step(monkeypatch, 3)
    summary = train(cut, **QUIET)
    assert summary["outcome"] == "interrupted" and summary["steps"] == 3
    assert (tmp_path / "cut" / "checkpoints" / "step-0000003" / "state.json").is_file()
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    monkeypatch.undo()

    resumed = train(cut, resume=True, **QUIET)
    assert resumed["outcome"] == "completed" and resumed["steps"] == 8
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bit-exact, dropout included
    evals = lambda out: [(m["step"], m["eval_loss"]) for m in read_metrics(out / "metrics.jsonl") if "eval_loss" in m]
    assert evals(tmp_path / "cut") == evals(tmp_path / "full")
    kind = "full" if method == "full-bf16" else "lora"
    assert_equal_weights(final_weights(tmp_path / "cut", kind), final_weights(tmp_path / "full", kind))


def test_checkpoints_rotate_and_resume_refuses_a_changed_run(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "r", "train.save_steps=2", "train.save_total_limit=2")
    train(cfg, **QUIET)
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step-0000004", "step-0000006"]
    with pytest.raises(SftlabError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg, **QUIET)
    changed = tiny_config(tiny_model_dir, tmp_path / "r", "train.save_steps=2", "train.lr=5e-3")
    with pytest.raises(SftlabError, match=r"config differs from the checkpoint's in train.lr"):
        train(changed, resume=True, **QUIET)
    with pytest.raises(SftlabError, match="no complete checkpoint"):
        train(tiny_config(tiny_model_dir, tmp_path / "empty"), resume=True, **QUIET)


def test_eval_loss_of_the_base_equals_an_independent_computation(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftlab.data.dataset import load_split
    from sftlab.model.load import load_tokenizer

    data = FIXTURES / "train_small.jsonl"
    cfg = tiny_config(tiny_model_dir, tmp_path / "e", f"data.eval=[{data}]", "train.max_steps=1")
    train(cfg, **QUIET)
    ours = read_metrics(tmp_path / "e" / "metrics.jsonl")[0]
    assert ours["step"] == 0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    eval_set = load_split(cfg.data, load_tokenizer(cfg.model), "eval").dataset
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_set:  # one example at a time: no padding, plain HF forward
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            logits = model(ids).logits[0, :-1]
            target = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert ours["eval_tokens"] == count
    assert ours["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_saved_models_load_with_plain_transformers_and_peft_and_match(tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    captured = {}
    real_save = train_mod.save_model
    monkeypatch.setattr(train_mod, "save_model", lambda run, *rest: (captured.update(lm=run.lm), real_save(run, *rest)))
    probe = torch.tensor([[1, 520, 9531, 198, 28120, 905, 2]])
    for method in ("lora", "full"):
        out = tmp_path / method
        train(tiny_config(tiny_model_dir, out, f"train.method={method}"), **QUIET)
        with torch.no_grad():
            expected = captured["lm"].eval()(probe).logits
        if method == "lora":
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            loaded = PeftModel.from_pretrained(base, out).eval()
        else:
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(probe).logits, expected, atol=1e-5)
        tok = AutoTokenizer.from_pretrained(out)
        assert "<|im_start|>" in tok.chat_template and tok.pad_token_id != tok.eos_token_id


def test_run_directory_contents(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    cfg = tiny_config(tiny_model_dir, out, "train.report_to=[tensorboard]", "data.eval_split=0.2", "train.eval_steps=3")
    summary = train(cfg, **QUIET)
    rows = read_metrics(out / "metrics.jsonl")
    for row in rows[1:]:
        assert {"step", "loss", "learning_rate", "grad_norm", "tokens"} <= row.keys()
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3, 6]
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / "data_report.json").read_text())["train"][0]["kept"] == 40
    assert summary["steps"] == 6 and summary["supervised_tokens"] > 0 and summary["first_eval_loss"] is not None
    assert json.loads((out / "summary.json").read_text()) == summary
    from sftlab.config import load_config

    assert load_config(out / "config.yaml") == cfg


def test_nonfinite_loss_stops_with_the_step_or_skips(tiny_model_dir, tmp_path, monkeypatch):
    import sftlab.model.loss as loss_mod

    real = loss_mod.loss_sum
    calls = {"n": 0}

    def nan_on_third(model, batch, *rest):
        calls["n"] += 1
        value = real(model, batch, *rest)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(loss_mod, "loss_sum", nan_on_third)
    with pytest.raises(SftlabError, match=r"step 3: the loss is nan.*train.on_nonfinite=skip"):
        train(tiny_config(tiny_model_dir, tmp_path / "n"), **QUIET)
    calls["n"] = 0
    summary = train(tiny_config(tiny_model_dir, tmp_path / "s", "train.on_nonfinite=skip"), **QUIET)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6
    assert [m.get("skipped", False) for m in read_metrics(tmp_path / "s" / "metrics.jsonl")][2]


def test_save_best_keeps_the_best_eval_weights(tiny_model_dir, tmp_path, monkeypatch):
    from sftlab.metrics import perplexity as eval_mod

    scripted = iter([5.0, 3.0, 4.0, 4.5])  # best at the first eval after step 0, i.e. step 2
    real = eval_mod.eval_loss
    monkeypatch.setattr(train_mod, "eval_now", lambda run: {**real(run.model, run.eval_data, 4, 0, run.accelerator),
                                                            "eval_loss": next(scripted)})
    cfg = tiny_config(tiny_model_dir, tmp_path / "b", "train.method=full", "data.eval_split=0.2",
                      "train.eval_steps=2", "train.save_best=true")
    summary = train(cfg, **QUIET)
    assert summary["best_step"] == 2 and summary["best_eval_loss"] == 3.0
    best = load_file(tmp_path / "b" / "best" / "trainable.safetensors")
    final = load_file(tmp_path / "b" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(final[name], best[name])


def test_early_stopping(tiny_model_dir, tmp_path, monkeypatch):
    scripted = iter([5.0, 4.0, 4.5, 4.6, 9.9])
    monkeypatch.setattr(train_mod, "eval_now", lambda run: {"eval_loss": next(scripted)})
    cfg = tiny_config(tiny_model_dir, tmp_path / "s", "data.eval_split=0.2", "train.eval_steps=1",
                      "train.early_stopping_patience=2")
    summary = train(cfg, **QUIET)
    assert summary["outcome"] == "early_stopping" and summary["steps"] == 3
