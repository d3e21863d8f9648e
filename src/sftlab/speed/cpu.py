"""Training on CPU: the cores this process may use, and a heap that keeps what a step freed.

A training step allocates and frees the same few GB every step (activations, gradients, logits
chunks). glibc hands large blocks back to the kernel on free and the next step faults every page
in again, which costs system time every step; keeping freed memory in the heap for reuse removes
most of those faults (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_MAX_THRESHOLD = 32 << 20  # glibc's ceiling: blocks above it are always mmapped


def use_cores() -> int:
    """Threads = the cores this process may use (not the host's), shared by the processes on this machine."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Tell glibc malloc to serve blocks up to 32 MB from the heap and never trim it; returns whether
    it applied (glibc only; other C libraries keep their defaults)."""
    name = ctypes.util.find_library("c")
    if not name or os.environ.get("SFTLAB_MALLOC_DEFAULTS"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX_THRESHOLD) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1  # int argument: 1 GB of free top before trimming
    ok &= mallopt(_M_TOP_PAD, 256 << 20) == 1  # grow the heap in 256 MB steps (untouched pages cost nothing)
    return bool(ok)
