"""sftlab's training attention: per-example attention for packed rows (docs/correctness.md rule 4), the causal kernel without a mask on padded batches, and the short-row CPU kernel."""

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.batching import collate, collate_packed
from sftlab.model.loss import loss_sum
from sftlab.speed import attention

ROWS = [{"input_ids": [1, 5, 9, 13, 2, 7, 8], "labels": [-100, -100, 9, 13, 2, -100, 8]},
        {"input_ids": [1, 4, 2], "labels": [-100, 4, 2]},
        {"input_ids": [3, 3, 3, 3], "labels": [3, 3, 3, 3]},
        {"input_ids": [6, 1, 5], "labels": [-100, 1, 5]}]


def tiny(tiny_model_dir, fused):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    if fused:
        assert attention.use_for_training(model)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["per-example-sdpa", "block-diagonal-mask"])
def test_packed_loss_equals_padded_loss_and_examples_are_isolated(tiny_model_dir, fused):
    model = tiny(tiny_model_dir, fused)
    with torch.no_grad():
        padded = loss_sum(model, collate(ROWS, 0)).item()
        packed_batch = collate_packed(ROWS, max_length=8, pad_id=0)
        packed = loss_sum(model, packed_batch).item()
        # Control: the same packed row without segment boundaries lets examples see each other.
        leaky = {k: packed_batch[k] for k in ("input_ids", "labels")}
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
        leak = loss_sum(model, leaky).item()
    assert packed == pytest.approx(padded, rel=1e-12)
    assert abs(leak - padded) / padded > 1e-5  # 10^7 times the tolerance above


def test_fused_causal_attention_equals_the_models_masked_attention_on_padded_batches(tiny_model_dir):
    with torch.no_grad():
        ours = loss_sum(tiny(tiny_model_dir, True), collate(ROWS, 0)).item()
        theirs = loss_sum(tiny(tiny_model_dir, False), collate(ROWS, 0)).item()
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_short_causal_attention_is_exact_in_float64_and_close_in_bf16():
    torch.manual_seed(0)
    for kv_heads in (3, 1):  # one key/value head per query head, and one shared by all three (GQA)
        q = torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, kv_heads, 17, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(lambda a, b, c: attention.ShortCausal.apply(a, b, c, 0.3), (q, k, v))
        out = attention.ShortCausal.apply(q, k, v, 8**-0.5)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert torch.allclose(out, ref, atol=1e-12)

    q = torch.randn(4, 9, 90, 64, requires_grad=True)
    k, v = (torch.randn(4, 3, 90, 64, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    assert attention._short_kernel_wins(low[0], 0.0) and not attention._short_kernel_wins(low[0], 0.1)
    out = attention.ShortCausal.apply(*low, 64**-0.5)
    grads = torch.autograd.grad(out.float().pow(2).sum(), low)
    rel = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm())
    assert rel(out, ref) < 1e-2  # bf16 rounding (SDPA's own bf16 flash kernel: ~3e-3)
    assert all(rel(g, r) < 2e-2 for g, r in zip(grads, ref_grads))
    long = torch.zeros(1, 1, attention.SHORT_TOKENS + 1, 8, dtype=torch.bfloat16)
    assert not attention._short_kernel_wins(long, 0.0) and not attention._short_kernel_wins(q, 0.0)  # fp32: SDPA
