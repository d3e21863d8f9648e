"""The training loss: the LM head only at supervised positions, scaled heads on the full path, and the chunked cross-entropy."""

import pytest
import torch

from sftlab.data.batching import collate
from sftlab.model.loss import chunked_cross_entropy, loss_sum


def test_supervised_only_head_equals_the_full_logits_loss(tiny_model_dir, monkeypatch):
    """The fast path (LM head only at supervised positions) gives the plain path's loss and grads."""
    from transformers import AutoModelForCausalLM

    import sftlab.model.loss as loss_mod

    rows = [{"input_ids": [1, 5, 9, 13, 2, 7], "labels": [-100, -100, 9, 13, 2, -100]},
            {"input_ids": [1, 4, 2], "labels": [-100, 4, 2]}]
    batch = collate(rows, pad_id=0)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(loss_mod, "_plain_head", lambda m: fast)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loss = loss_sum(model, batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    for name in fast_grads:
        assert float((fast_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()) < 1e-5, name
    # and both equal the textbook mean CE times the token count
    logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert fast_loss == pytest.approx(ref.item(), rel=1e-5)


def test_models_with_scaled_heads_take_the_full_path():
    from types import SimpleNamespace

    from sftlab.model.loss import _plain_head

    assert not _plain_head(SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0)))


def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    results = []
    for chunk in (1000, 7):
        hidden.grad, head.weight.grad = None, None
        loss = chunked_cross_entropy(hidden, head, targets, chunk)
        loss.backward()
        results.append((loss.item(), hidden.grad.clone(), head.weight.grad.clone()))
    (l1, h1, w1), (l2, h2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(w1, w2, atol=1e-6)
