"""Attention for training batches: causal SDPA without a mask tensor, per example when packed.

Training batches are right-padded or packed, never left-padded, so a plain causal kernel is exact:
a real token never sees the padding to its right. That lets PyTorch pick its fused (flash) CPU and
GPU kernels, which it refuses once an explicit mask is passed. Packed rows carry `cu_seq_lens_q`
(the flash-attention varlen convention); each example then attends only within itself (GUIDE rule
4) at the cost of its own length squared, not the packed row's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sftlab_sdpa"


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cu_seq_lens_q=None, **kwargs):  # fmt: skip
    """query/key/value: [batch, heads, tokens, head_dim] -> output [batch, tokens, heads, head_dim]."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)
        return out.transpose(1, 2).contiguous(), None
    b, h, t, d = query.shape
    # Segments are given over the row-major flattening of the batch; every row ends on a boundary.
    flat = [x.transpose(0, 1).reshape(h, b * t, d) for x in (query, key, value)]
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        F.scaled_dot_product_attention(*(x[:, s:e].unsqueeze(0) for x in flat), dropout_p=dropout,
                                       scale=scaling, is_causal=True)[0]  # fmt: skip
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(pieces, dim=1).reshape(h, b, t, d).permute(1, 2, 0, 3)
    return out.contiguous(), None


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
