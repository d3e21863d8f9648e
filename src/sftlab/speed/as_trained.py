"""A finished run's model computed as its training computed it, for `sftlab eval`.

Training's eval loss ran on the precision path and attention kernel sftlab.speed chose: a LoRA
base in bf16 under bf16 autocast, say. Evaluating the saved model in fp32 instead moves the loss by
up to 0.7% on the quickstart run (benchmarks/RESULTS.md), which reads as a regression that is not
there. The run's summary.json records the path (`compute`); this module turns it back into the
dtype to load in and the context to compute in.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from sftlab.model.precision import dtype_of, half_dtype
from sftlab.speed import attention, training_forwards


@dataclass(frozen=True)
class Compute:
    """What a run computed in: its resolved precision, whether a full model ran in bf16 over fp32
    masters, the autocast accelerate applied (no | bf16 | fp16) and the attention kernel."""

    precision: str
    masters: bool
    autocast: str
    attention: str

    def record(self) -> dict:
        return asdict(self)


FP32 = Compute("fp32", False, "no", "sdpa")


def from_record(record: dict | None) -> Compute | None:
    """The summary's `compute` entry (None for a run from before it was recorded, or a bad entry)."""
    try:
        return Compute(str(record["precision"]), bool(record["masters"]), str(record["autocast"]),
                       str(record["attention"]))  # fmt: skip
    except (KeyError, TypeError):
        return None


def weights_dtype(compute: Compute, adapter: bool) -> torch.dtype:
    """The dtype the run's non-quantized weights computed in: an adapter's frozen base in the half type
    (as model.load.frozen_dtype loaded it), a full model in bf16 when it ran over masters, else fp32."""
    half = half_dtype(compute.precision)
    return half if half is not None and (adapter or compute.masters) else torch.float32


@contextlib.contextmanager
def computing(model: torch.nn.Module, compute: Compute, kernels: bool = True):
    """Autocast as in training; with kernels, also training's attention (a full-sequence kernel, so
    only for scoring whole sequences: generation with a KV cache keeps the model's own) and the forwards
    training switched to (the lean RMSNorm, LoRA's update inside the matmul): in bf16 their roundings
    differ from the model's own, and the loss would not read as trained."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = getattr(base.config, "_attn_implementation", None)
    switch = (kernels and compute.attention == attention.NAME and previous != attention.NAME
              and attention.supports(base.config))  # fmt: skip
    device = next(model.parameters()).device.type
    cast = (torch.autocast(device, dtype=dtype_of(compute.autocast)) if compute.autocast != "no"
            else contextlib.nullcontext())  # fmt: skip
    switched: list[torch.nn.Module] = []
    try:
        if switch:
            attention.use_for_training(base)
        if kernels:
            _training_forwards(model, switched)
        with cast:
            yield
    finally:
        for module in switched:
            vars(module).pop("forward", None)  # back to the class's own forward
        if switch:
            base.set_attn_implementation(previous)


def _training_forwards(model: torch.nn.Module, switched: list) -> None:
    """Switch the modules training runs on sftlab.speed's own forwards to them, adding each to `switched`."""
    own = {id(m) for m in model.modules() if "forward" in vars(m)}
    try:
        training_forwards(model)
    finally:
        switched += [m for m in model.modules() if "forward" in vars(m) and id(m) not in own]
