"""Precision names (`train.precision`, `--precision`) and their torch dtypes, written once."""

from __future__ import annotations

from pathlib import Path

import torch

from sftlab.errors import ModelError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    """The dtype of a resolved precision (fp32 | bf16 | fp16)."""
    return DTYPES[precision]


def half_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit compute dtype of `precision`, or None for fp32."""
    return DTYPES[precision] if precision in ("bf16", "fp16") else None


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def resolve_precision(requested: str) -> str:
    """fp32 | bf16 | fp16 for this machine; `auto` takes bf16 where the hardware runs it fast."""
    cuda = torch.cuda.is_available()
    if requested == "fp16" and not cuda:
        raise ModelError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ModelError("this GPU has no bf16 support; use train.precision=fp16 or fp32")
    if requested != "auto":
        return requested
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    # avx512_bf16 / AMX run bf16 matmuls natively, faster than fp32 (benchmarks/RESULTS.md); without them
    # bf16 is emulated and slow.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
