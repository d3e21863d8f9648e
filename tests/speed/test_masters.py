"""bf16 compute with fp32 master weights: accumulation, clipping, the pieced step, the sparse tied lookup, the saved model."""

import pytest
import torch
from conftest import tiny_config
from helpers import losses
from safetensors.torch import load_file

import sftlab.loop.train as train_mod
from sftlab.config import TrainConfig
from sftlab.loop.optim import build_optimizer
from sftlab.loop.train import train
from sftlab.speed import masters as masters_mod
from sftlab.speed.masters import MasterWeights

QUIET = {"say": lambda *a, **k: None}


def test_master_weights_accumulate_clip_and_step_in_fp32(monkeypatch):
    monkeypatch.setattr(masters_mod, "PIECE_ELEMENTS", 24)  # the 64 weights are cut, the 8 biases batched
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    start = [p.detach().clone() for p in model.parameters()]
    masters = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 and torch.equal(m, s) for m, s in zip(masters.masters, start))
    grads = []
    for last, x in ((False, torch.randn(4, 8)), (True, torch.randn(4, 8))):
        masters.last_micro_batch = last
        model(x.bfloat16()).float().sum().backward()
        grads.append([p.grad.float().clone() if p.grad is not None else None for p in model.parameters()])
    assert grads[0] == [None] * 4  # earlier micro-batches go straight into the fp32 masters
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())  # the last one waits for the step
    norm = masters.grad_norm()
    total = [m.grad.clone() for m in masters.masters]  # fp32 sum of both micro-batches
    assert norm == pytest.approx(float(torch.cat([g.flatten() for g in total]).norm()), rel=1e-6)

    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    reference = [torch.nn.Parameter(s.clone()) for s in start]
    expected = build_optimizer(torch.nn.ParameterList(reference), cfg)  # torch's own fused AdamW, whole tensors
    for r, g in zip(reference, total):
        r.grad = g * 0.5
    expected.step()
    optimizer = build_optimizer(masters, cfg)
    masters.step(optimizer, 0.5)
    for p, m, r, s in zip(model.parameters(), masters.masters, reference, start):
        assert torch.equal(m, r) and not torch.equal(m, s)  # bit for bit torch's step
        assert torch.equal(p, m.bfloat16()) and p.grad is None and m.grad is None
    for got, want in zip(optimizer.state_dict()["state"].values(), expected.state_dict()["state"].values()):
        assert all(torch.equal(got[k], want[k]) for k in ("step", "exp_avg", "exp_avg_sq"))  # checkpoints match
    with pytest.raises(ValueError, match="fused AdamW"):
        masters.step(torch.optim.SGD(masters.parameters(), lr=1.0), 1.0)
    masters.release()
    assert all(p.dtype == torch.float32 and p is not m for p, m in zip(model.parameters(), masters.masters))
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), masters.masters))


def test_a_tied_embedding_gets_the_same_gradient_through_its_sparse_lookup(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 5, 7, 5, 9, 11, 3]])  # repeated tokens: rows of the lookup's gradient add up

    def embedding_grad(dtype, with_masters):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).to(dtype)
        masters = MasterWeights(model) if with_masters else None
        assert model.get_input_embeddings().sparse == with_masters  # tied, on CPU: sparse lookup
        model(input_ids=ids, labels=ids).loss.backward()
        grad = model.get_input_embeddings().weight.grad
        assert not grad.is_sparse  # summed into the LM head's dense gradient before the optimizer sees it
        if masters:
            masters.release()
            assert not model.get_input_embeddings().sparse
        return grad.float()

    reference = embedding_grad(torch.float32, False)  # the same (bf16-rounded) weights, dense, in fp32
    rel = lambda g: float((g - reference).norm() / reference.norm())
    assert rel(embedding_grad(torch.bfloat16, True)) < 1e-2
    assert rel(embedding_grad(torch.bfloat16, True)) <= 1.5 * rel(embedding_grad(torch.bfloat16, False)) + 1e-3


def test_master_weights_grad_norm_of_bf16_gradients_is_the_fp32_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1100, 1000), torch.nn.Linear(1000, 1))  # 1.1M weights: sliced
    masters = MasterWeights(model)
    model(torch.randn(3, 1100).bfloat16()).float().sum().backward()  # one micro-batch: gradients stay bf16
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    assert masters.grad_norm() == pytest.approx(float(grads.double().norm()), rel=1e-5)  # fp32 sums
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler")  # the masters' step is a step
def test_full_bf16_run_computes_in_bf16_and_saves_fp32_masters(tiny_model_dir, tmp_path, monkeypatch):
    seen = []
    real = train_mod.clip_and_step

    def spy(run, loss, step):
        trainable = [p for p in run.weights.parameters() if p.requires_grad]
        state = len(run.optimizer.state) == len(trainable)  # made before step 1's forward, on either path
        seen.append((run.speed.masters, {p.dtype for p in run.lm.parameters()}, state))
        return real(run, loss, step)

    monkeypatch.setattr(train_mod, "clip_and_step", spy)
    out = tmp_path / "bf16"
    cfg = tiny_config(tiny_model_dir, out, "train.method=full", "train.precision=bf16", "train.grad_accum=2",
                      "train.save_steps=3", "train.max_steps=3")  # fmt: skip
    summary = train(cfg, **QUIET)
    assert summary["precision"] == "bf16" and seen == [(True, {torch.bfloat16}, True)] * 3
    saved = load_file(out / "model.safetensors")
    masters = load_file(out / "checkpoints" / "step-0000003" / "trainable.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    for name, tensor in masters.items():  # the final model is the fp32 masters, not their bf16 rounding
        assert tensor.dtype == torch.float32
        assert torch.equal(saved.get(name, saved.get(name.replace("model.embed_tokens", "lm_head"))), tensor), name
    assert any(not torch.equal(t, t.bfloat16().float()) for t in masters.values())
    fp32 = tmp_path / "fp32"
    seen.clear()
    train(tiny_config(tiny_model_dir, fp32, "train.method=full", "train.grad_accum=2", "train.max_steps=3"), **QUIET)
    assert seen == [(False, {torch.float32}, True)] * 3
    assert losses(out) == pytest.approx(losses(fp32), rel=2e-2)  # bf16 compute tracks the fp32 run


def test_masters_are_not_used_where_they_do_not_apply(tiny_model_dir):
    from sftlab.speed.masters import applies

    cfg = tiny_config(tiny_model_dir, "/tmp/unused", "train.method=full")
    assert applies(cfg, "bf16", True)
    assert not applies(cfg, "bf16", False) and not applies(cfg, "fp32", True)
    assert not applies(tiny_config(tiny_model_dir, "/tmp/unused", "train.method=freeze"), "bf16", True)
    assert not applies(tiny_config(tiny_model_dir, "/tmp/unused", "train.method=lora"), "bf16", True)
