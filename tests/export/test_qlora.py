"""A qlora run is read on the 4-bit NF4 base it trained on: `sftlab eval` reproduces the training's eval
loss, and `sftlab merge` folds the adapter into the dequantized NF4 weights (or, asked, the original base)."""

import json

import pytest
import torch
from conftest import FIXTURES, redrawn_model, tiny_config

from sftlab.export.merge import NF4_ATOL, ExportError, _check_batch, _logits, merge
from sftlab.loop.train import train
from sftlab.rundir import load_run

pytest.importorskip("bitsandbytes")
QUIET = {"say": lambda *a, **k: None}
EVAL = FIXTURES / "train_small.jsonl"
EVAL_OVERRIDES = ["eval.max_examples=1", "eval.max_new_tokens=2", "eval.semantic=false", "eval.bertscore=false",
                  "eval.meteor=false"]


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """A qlora run (fp32 path, 4-bit NF4 base) of the tiny model with weights of std 0.1: large enough
    that NF4 rounding moves the eval loss and logits well beyond the checks' tolerances (the default
    tiny model's std 0.02 weights would hide it), small enough that bf16 compute noise stays low."""
    base = redrawn_model(tiny_model_dir, tmp_path_factory.mktemp("std01"), std=0.1)
    out = tmp_path_factory.mktemp("qlora-run")
    train(tiny_config(base, out, "train.method=qlora", "train.lr=1e-2", f"data.eval=[{EVAL}]"), **QUIET)
    return out


def _eval_loss(loaded) -> float:
    from sftlab.evaluate.runner import prepare_inputs
    from sftlab.metrics.perplexity import eval_loss
    from sftlab.model.loss import SupervisedLoss

    inputs = prepare_inputs(loaded.cfg, loaded.tokenizer)
    return eval_loss(SupervisedLoss(loaded.model, loaded.cfg.train.loss_chunk_tokens), inputs.eval_data,
                     loaded.cfg.eval.batch_size, loaded.tokenizer.pad_token_id)["eval_loss"]  # fmt: skip


def test_eval_of_a_qlora_run_reports_the_training_eval_loss(qlora_run):
    from sftlab.evaluate.runner import run_eval
    from sftlab.model.load import is_4bit

    trained = json.loads((qlora_run / "summary.json").read_text())["final_eval_loss"]
    record = run_eval(str(qlora_run), EVAL_OVERRIDES, **QUIET)
    assert record["models"]["model"]["metrics"]["eval/loss"] == pytest.approx(trained, rel=1e-4)
    assert is_4bit(load_run(str(qlora_run)).model)
    # the check can fail: the adapter on the full-precision base (what load_run used to build) is off
    assert _eval_loss(load_run(str(qlora_run), full_precision_base=True)) != pytest.approx(trained, rel=1e-4)


def test_merge_of_a_qlora_run_folds_into_the_nf4_weights_by_default(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    quantized = load_run(str(qlora_run))
    batch = _check_batch(quantized.tokenizer)
    as_trained = _logits(quantized.model, batch)
    bound = NF4_ATOL * max(1.0, as_trained.abs().max().item())
    exported = {}
    for into, out in ((None, tmp_path / "nf4"), ("full-precision", tmp_path / "fp")):
        merge(str(qlora_run), str(out), into=into)
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        exported[into] = _logits(model, batch)
    nf4, fp = ((exported[k] - as_trained).abs().max().item() for k in (None, "full-precision"))
    assert nf4 <= bound  # the model the run trained (up to bf16 compute)
    assert fp > bound and fp > 10 * nf4  # another model: it would fail the check the NF4 export passes
    full = load_run(str(qlora_run), full_precision_base=True)  # ... the adapter on the original base, exactly
    assert torch.allclose(exported["full-precision"], _logits(full.model, batch), atol=1e-4)


def test_merge_into_nf4_needs_a_qlora_run(lora_run, tmp_path):
    with pytest.raises(ExportError, match="not a qlora run"):
        merge(str(lora_run), str(tmp_path / "m"), into="nf4")
    with pytest.raises(ExportError, match="choose one of"):
        merge(str(lora_run), str(tmp_path / "m"), into="int8")
    assert not (tmp_path / "m").exists()
    assert merge(str(lora_run), str(tmp_path / "m"), into="full-precision") < 1e-4


def test_a_nf4_merge_that_does_not_match_is_removed(qlora_run, tmp_path, monkeypatch):
    import sftlab.export.merge as M

    real = M._dequantized_weights

    def off(model):  # one weight that is not the one the run trained with
        weights = real(model)
        key = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
        weights[key] = weights[key] + 0.5
        return weights

    monkeypatch.setattr(M, "_dequantized_weights", off)
    with pytest.raises(ExportError, match="logits differ"):
        merge(str(qlora_run), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
