"""AdamW with decay only where it belongs, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from sftlab.config import TrainConfig
from sftlab.speed.masters import adamw_state


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is much faster than the default foreach one on CPU (benchmarks/RESULTS.md); it
    # needs floating-point parameters on CPU or CUDA.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        fused=fused,
    )


def init_state(optimizer) -> None:
    """Create a fused AdamW's state now, before the first forward, as its first step would.

    Made in step 1 (torch's way), the state (2x the trainable weights in fp32) takes the heap space
    that step's activations left, and step 2's activations fault fresh pages in, which slows step 2
    on CPU (benchmarks/RESULTS.md)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in inner.param_groups:
        if group.get("fused") and not group.get("amsgrad"):
            for p in group["params"]:
                adamw_state(inner, p)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)  # HF's "constant" ignores warm-up
    extra = {"min_lr_rate": cfg.min_lr_ratio} if cfg.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps), num_training_steps=total_steps,
        scheduler_specific_kwargs=extra,
    )
