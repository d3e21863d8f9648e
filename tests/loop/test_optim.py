"""AdamW parameter groups, its state made before the first step, and the schedules."""

import copy

import pytest
import torch

from sftlab.config import TrainConfig
from sftlab.loop.optim import build_optimizer, build_scheduler, init_state


def test_no_weight_decay_on_biases_and_norms(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and "norm" not in name), name


def test_optimizer_state_made_before_the_first_step_is_torchs_own():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    early, late = (build_optimizer(m, TrainConfig(lr=0.1)) for m in (model, copy.deepcopy(model)))
    init_state(early)
    assert len(early.state) == 4 and len(late.state) == 0  # weights, bias, norm weight and bias
    for _ in range(2):
        for opt in (early, late):
            opt.zero_grad()
            group_params = [p for g in opt.param_groups for p in g["params"]]
            sum(p.sum() for p in group_params).pow(2).backward()
            opt.step()
    got, want = early.state_dict(), late.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for a, b in zip(got["state"].values(), want["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("name,last", [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0), ("cosine_with_min_lr", 0.1)])
def test_schedules_warm_up_then_follow_their_shape(name, last):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = TrainConfig(lr=1.0, scheduler=name, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert sched.get_last_lr()[0] == pytest.approx(last, abs=1e-6)
    del p


def test_warmup_ratio(tiny_model_dir):
    from sftlab.loop.optim import warmup_steps

    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 95) == 10
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=3), 95) == 3
