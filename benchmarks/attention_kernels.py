"""CPU attention for training rows: sftlab's short-row kernel against PyTorch's fused SDPA (its CPU
flash kernel), forward and backward in bf16, alternating, at each row length. `attention.SHORT_TOKENS`
is where the two cross.

    python benchmarks/attention_kernels.py                       # SmolLM2-135M's heads, 8 rows
    python benchmarks/attention_kernels.py --heads 32 --kv-heads 8 --head-dim 128 --rows 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sftlab.speed import cpu
from sftlab.speed.attention import SHORT_TOKENS, ShortCausal


def inputs(rows: int, tokens: int, heads: int, kv_heads: int, head_dim: int):
    """q, k, v as the models hand them over (transposed views of [rows, tokens, heads, head_dim])."""
    make = lambda h: torch.randn(rows, tokens, h, head_dim).bfloat16().transpose(1, 2).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), torch.randn(rows, heads, tokens, head_dim).bfloat16()


def short(q, k, v):
    return ShortCausal.apply(q, k, v, q.shape[-1] ** -0.5)


def sdpa(q, k, v):
    groups = q.shape[1] // k.shape[1]  # PyTorch's CPU kernels take k/v repeated per query head
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_both(q, k, v, grad, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward for each kernel, the two alternating (this VM drifts)."""
    times = {"short": [], "sdpa": []}
    for _ in range(repeats + 2):
        for name, kernel in (("short", short), ("sdpa", sdpa)):
            q.grad = k.grad = v.grad = None
            start = time.perf_counter()
            kernel(q, k, v).backward(grad)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64,96,128,160,192,224,256,384", help="row lengths in tokens")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"{cpu.use_cores()} threads; rows {args.rows}, heads {args.heads}/{args.kv_heads} (q/kv), head dim "
          f"{args.head_dim}; sftlab uses the short kernel up to {SHORT_TOKENS} tokens")  # fmt: skip
    print("tokens  short ms   SDPA ms   SDPA / short")
    for tokens in (int(x) for x in args.lengths.split(",")):
        t = time_both(*inputs(args.rows, tokens, args.heads, args.kv_heads, args.head_dim), args.repeats)
        print(f"{tokens:6d}  {t['short'] * 1e3:8.1f}  {t['sdpa'] * 1e3:8.1f}   {t['sdpa'] / t['short']:6.2f}x")


if __name__ == "__main__":
    main()
