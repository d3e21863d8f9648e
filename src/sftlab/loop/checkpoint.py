"""Checkpoints that resume the exact run: trainable weights, optimizer, scheduler, RNG, data position.

A checkpoint is written into a temporary directory and renamed into place (`files.atomic_dir`),
so a crash mid-save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sftlab.files import atomic_dir

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, model, optimizer, scheduler, state: dict, config_yaml: str, keep: int,
         method_state: dict | None = None) -> Path:  # fmt: skip
    """Write checkpoint `step` atomically, then drop the oldest beyond `keep` (0 keeps all).

    `method_state`: what a training method keeps outside its parameters (AdaLoRA's importance scores)."""
    final = root / f"{PREFIX}{step:07d}"
    with atomic_dir(final, replace=True) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if method_state is not None:
            torch.save(method_state, tmp / "method.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if keep > 0:
        for old in complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file())


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved in `path`; returns the loop state. RNG is restored last."""
    load_trainable(model, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def load_method_state(path: Path) -> dict | None:
    return torch.load(path / "method.pt", weights_only=False) if (path / "method.pt").is_file() else None
