"""Attention for training batches: causal SDPA without a mask tensor, per example when packed.

Training batches are right-padded or packed, never left-padded, so a plain causal kernel is exact:
a real token never sees the padding to its right. That lets PyTorch pick its fused (flash) CPU and
GPU kernels, which it refuses once an explicit mask is passed. Packed rows carry `cu_seq_lens_q`
(the flash-attention varlen convention); each example then attends only within itself
(docs/correctness.md rule 4) at the cost of its own length squared, not the packed row's: on CUDA in
one flash-attention varlen call (PyTorch's own, no extra package), elsewhere one fused SDPA call per
example.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from sftlab.model.precision import is_half

NAME = "sftlab_sdpa"


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):  # fmt: skip
    """query/key/value: [batch, heads, tokens, head_dim] -> output [batch, tokens, heads, head_dim]."""
    groups = getattr(module, "num_key_value_groups", 1)
    dropout = dropout if module.training else 0.0
    if cu_seq_lens_q is not None and dropout == 0.0 and _varlen_applies(query):
        return _varlen(query, key, value, cu_seq_lens_q, max_length_q, scaling, groups), None
    if cu_seq_lens_q is None and _short_kernel_wins(query, dropout):
        out = ShortCausal.apply(query, key, value, scaling or query.shape[-1] ** -0.5)
        return out.transpose(1, 2).contiguous(), None
    key, value, gqa = _kv_heads(key, value, groups, shared=query.is_cuda)  # CPU kernels want them repeated
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True, **gqa)
        return out.transpose(1, 2).contiguous(), None
    b, h, t, d = query.shape
    # Segments are given over the row-major flattening of the batch; every row ends on a boundary.
    flat = [x.transpose(0, 1).reshape(x.shape[1], b * t, d) for x in (query, key, value)]
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        F.scaled_dot_product_attention(*(x[:, s:e].unsqueeze(0) for x in flat), dropout_p=dropout,
                                       scale=scaling, is_causal=True, **gqa)[0]  # fmt: skip
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(pieces, dim=1).reshape(h, b, t, d).permute(1, 2, 0, 3)
    return out.contiguous(), None


def _kv_heads(key, value, groups: int, shared: bool):
    """k/v as a kernel takes them: shared by each group of query heads (the kernel's `enable_gqa`,
    returned as its keyword) or repeated to one per query head."""
    if groups == 1:
        return key, value, {}
    if shared:
        return key, value, {"enable_gqa": True}
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), {}


@functools.cache
def _varlen_kernel():
    """PyTorch's own flash-attention varlen entry (torch >= 2.10), as (function, shares k/v heads),
    or None. Its causal switch was renamed between releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return functools.partial(varlen_attn, **causal), "enable_gqa" in params


def _varlen_applies(query: torch.Tensor) -> bool:
    return varlen_runs(query.device, query.dtype)


def varlen_runs(device, dtype) -> bool:
    """Whether packed rows on this device and dtype take the one flash-attention varlen call."""
    return torch.device(device).type == "cuda" and is_half(dtype) and _varlen_kernel() is not None


def _varlen(query, key, value, cu_seq_lens, max_length, scaling, groups: int) -> torch.Tensor:
    """Packed rows on CUDA: one flash-attention call over all segments, each attending only to itself."""
    kernel, shares_heads = _varlen_kernel()
    key, value, extra = _kv_heads(key, value, groups, shares_heads)
    b, _, t, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    length = int(max_length) if max_length is not None else int((cu[1:] - cu[:-1]).max())
    out = kernel(q, k, v, cu, cu, length, length, scale=scaling, **extra)
    return out.reshape(b, t, out.shape[-2], d)


# PyTorch's CPU flash kernel is tuned for long rows and slower than this kernel on short ones;
# SHORT_TOKENS is about where the two cross, measured forward and backward (benchmarks/RESULTS.md).
SHORT_TOKENS = 176


def _short_kernel_wins(query: torch.Tensor, dropout: float) -> bool:
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and query.shape[-2] <= SHORT_TOKENS
            and dropout == 0.0)  # fmt: skip


class ShortCausal(torch.autograd.Function):
    """Causal attention for short rows: bf16 matmuls, fp32 softmax (as the models' own eager attention),
    and like flash attention it saves only q, k and v, recomputing the probabilities in backward.
    k and v keep their own heads: each one's group of query heads is one matmul against it, so they
    are not repeated per query head and their gradients are summed over the group in fp32."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        p, _, vc = ShortCausal._probs(q, k, v, scale)
        return torch.bmm(p.to(q.dtype), vc).reshape(q.shape)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        p, (qs, kc), vc = ShortCausal._probs(q, k, v, ctx.scale)
        do = dout.reshape(qs.shape)
        dv = torch.bmm(p.to(q.dtype).transpose(1, 2), do)
        dp = torch.bmm(do, vc.transpose(1, 2)).to(p.dtype)
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype).to(q.dtype)
        dq = torch.bmm(ds, kc).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), qs)
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), None

    @staticmethod
    def _probs(q, k, v, scale):
        """Probabilities [batch * kv heads, group * t, t]: the rows of a group's query heads stacked."""
        b, h, t, d = q.shape
        kv = k.shape[1]
        qs = (q * scale).reshape(b * kv, h // kv * t, d)
        kc, vc = k.reshape(b * kv, t, d), v.reshape(b * kv, t, d)
        causal = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1).repeat(h // kv, 1)
        scores = torch.baddbmm(causal, qs, kc.transpose(1, 2))  # + 0 or -inf: exact in any dtype
        return torch.softmax(scores, -1, dtype=torch.promote_types(q.dtype, torch.float32)), (qs, kc), vc


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_attention)


def supports(config) -> bool:
    """Plain causal decoders only: sliding windows or bidirectional spans need the model's own masks."""
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return False
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager", NAME)


def use_for_training(model) -> bool:
    """Switch a model to this attention when it is safe; returns whether it did."""
    if not supports(model.config):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
