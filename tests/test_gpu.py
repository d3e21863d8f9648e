"""The CUDA paths: run on a GPU machine (`pytest tests/test_gpu.py`), skipped where there is none (CI)."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from helpers import interrupt_during_step, losses

from sftlab.data.batching import collate, collate_packed
from sftlab.loop.train import _to, train
from sftlab.model.loss import loss_sum
from sftlab.speed import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = [{"input_ids": [1, 5, 9, 13, 2, 7, 8] * 3, "labels": [-100, -100, 9, 13, 2, -100, 8] * 3},
        {"input_ids": [1, 4, 2], "labels": [-100, 4, 2]},
        {"input_ids": [3, 3, 3, 3] * 4, "labels": [3, 3, 3, 3] * 4},
        {"input_ids": [6, 1, 5], "labels": [-100, 1, 5]}]


def cuda_model(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda()
    assert attention.use_for_training(model)
    return model


def grads(model):
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def test_varlen_attention_keeps_packed_examples_apart_on_cuda():
    import torch.nn.functional as F

    assert attention._varlen_kernel() is not None, f"torch {torch.__version__} has no varlen attention"
    torch.manual_seed(0)
    b, t, h, kv, d = 2, 24, 4, 2, 16
    bounds = [0, 21, 24, 40, 43, 48]  # two packed rows of 24; each row ends on a boundary
    module = SimpleNamespace(num_key_value_groups=h // kv, training=True)
    q, k, v = (torch.randn(b, n, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (h, kv, kv))
    assert attention._varlen_applies(q)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    weight = torch.randn(b, t, h, d, device="cuda")

    def reference(segments):  # fp32, one SDPA call per segment, k/v heads repeated
        qf, kf, vf = (x.float().repeat_interleave(h // x.shape[1], 1).transpose(0, 1).reshape(h, b * t, d)
                      for x in (q, k, v))  # fmt: skip
        pieces = [F.scaled_dot_product_attention(qf[:, s:e], kf[:, s:e], vf[:, s:e], is_causal=True)
                  for s, e in zip(segments[:-1], segments[1:])]  # fmt: skip
        return torch.cat(pieces, 1).reshape(h, b, t, d).permute(1, 2, 0, 3)

    results = []
    for out in (attention.causal_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=21)[0],
                reference(bounds)):  # fmt: skip
        grads = torch.autograd.grad((out.float() * weight).sum(), (q, k, v))
        results.append((out.float(), grads))
    (ours, our_grads), (ref, ref_grads) = results
    assert (ours - ref).abs().max() < 3e-2  # bf16 inputs and output
    for g, r in zip(our_grads, ref_grads):
        assert torch.nn.functional.cosine_similarity(g.float().flatten(), r.float().flatten(), dim=0) > 0.999
    with torch.no_grad():  # control: attending across each whole row moves the output far more
        assert (reference([0, 24, 48]) - ref).abs().max() > 0.3


def test_packed_training_batches_match_padded_ones_on_cuda(tiny_model_dir, monkeypatch):
    calls = []
    real = attention._varlen
    monkeypatch.setattr(attention, "_varlen", lambda *a: calls.append(1) or real(*a))
    model = cuda_model(tiny_model_dir, torch.bfloat16)
    results = []
    for batch in (collate(ROWS, 0), collate_packed(ROWS, max_length=24, pad_id=0)):
        model.zero_grad()
        loss = loss_sum(model, _to(batch, "cuda"))
        loss.backward()
        results.append((loss.item(), grads(model)))
    assert len(calls) == model.config.num_hidden_layers  # the packed pass only, one call a layer
    (padded, g1), (packed, g2) = results
    assert packed == pytest.approx(padded, rel=1e-2)  # bf16: other kernels, other roundings
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.999


def test_gqa_attention_without_repeated_heads_equals_the_models_own_on_cuda(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    ours = cuda_model(tiny_model_dir, torch.float32)
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads
    batch = _to(collate(ROWS, 0), "cuda")
    with torch.no_grad():
        assert loss_sum(ours, batch).item() == pytest.approx(loss_sum(theirs, batch).item(), rel=1e-5)


@pytest.mark.parametrize("layout,expected", [(["data.padding_free=false"], "padded"), (["data.packing=true"], "packed"),
                                             ([], "flat")], ids=["padded", "packed", "flat-by-default"])
def test_full_bf16_training_on_cuda_over_fp32_masters_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, layout,
                                                                      expected):  # fmt: skip
    common = ["train.method=full", "train.precision=bf16", "train.max_steps=6", *layout]
    said = []
    summary = train(tiny_config(tiny_model_dir, tmp_path / "full", *common), say=lambda *a, **k: said.append(str(a)))
    assert any(f"batches {expected};" in x for x in said)
    assert summary["precision"] == "bf16"
    full = losses(tmp_path / "full")
    assert all(x == x for x in full) and full[-1] < full[0]
    interrupt_during_step(monkeypatch, 3)
    cut = tiny_config(tiny_model_dir, tmp_path / "cut", *common)
    assert train(cut, say=lambda *a: None)["steps"] == 3
    monkeypatch.undo()
    train(cut, resume=True, say=lambda *a: None)
    assert losses(tmp_path / "cut") == full  # bit for bit


def test_qlora_trains_on_cuda(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    train(tiny_config(tiny_model_dir, out, "train.method=qlora", "train.precision=bf16"), say=lambda *a: None)
    run = losses(out)
    assert all(x == x for x in run) and run[-1] < run[0]
    assert (out / "adapter_model.safetensors").is_file()


def test_rmsnorm_on_cuda_uses_the_fused_kernel_and_matches_the_models_own():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from sftlab.speed import rmsnorm

    torch.manual_seed(0)
    ours, theirs = LlamaRMSNorm(256).cuda().bfloat16(), LlamaRMSNorm(256).cuda().bfloat16()
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    model = torch.nn.Sequential(ours)
    assert rmsnorm.use_for_training(model) == 1
    x = torch.randn(8, 64, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for norm in (ours, theirs):
        a = x.clone().requires_grad_(True)
        out = norm(a)
        out.float().square().sum().backward()
        results.append((out.float(), a.grad.float(), norm.weight.grad.float()))
    for mine, ref in zip(*results):
        assert torch.nn.functional.cosine_similarity(mine.flatten(), ref.flatten(), dim=0) > 0.9999
        assert ((mine - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharding_engines_match_one_process_and_save_the_whole_model(tiny_model_dir, tmp_path, engine):
    """One GPU, one process through each shipped engine config (the FSDP one trains on train.sharding=fsdp,
    over a 1-rank NCCL group): the same losses and saved weights as a plain run (what sharding across
    several GPUs adds is not covered by a one-GPU machine)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from safetensors.torch import load_file

    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    common = ["train.method=full", "train.precision=fp32", "train.max_steps=4", "train.batch_size=8"]
    train(tiny_config(tiny_model_dir, tmp_path / "one", *common), say=lambda *a: None)
    out = tmp_path / engine
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "examples" / "accelerate" / f"{engine}.yaml"), "--num_processes", "1", "-m", "sftlab", "train",
              str(_write_config(tiny_model_dir, out, common, tmp_path))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    ours, ref = load_file(out / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert ours.keys() == ref.keys()
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ref) < 1e-5


def _write_config(model_dir, out, overrides, tmp_path):
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(tiny_config(model_dir, out, *overrides).to_yaml(), encoding="utf-8")
    return path
