"""Eval loss and perplexity: token-weighted over the whole eval set, response tokens only, with the
same per-token normalizer as training (a mean of per-batch means would weight short batches up).
Examples' loss weights shape training only: eval loss is the plain mean over tokens."""

from __future__ import annotations

import math

import torch

from sftlab.data.batching import collate as collate_padded
from sftlab.data.batching import example_lengths, rows, supervised_count, without_weights


def eval_loss(loss_module, data, batch_size: int, pad_id: int, accelerator=None, collate_fn=None, count_fn=None) -> dict:
    """{eval_loss, eval_ppl, eval_tokens}; `accelerator` spreads batches over ranks (None: one process).
    Eval data from several datasets (its `source` column) also gets eval_loss/<name> per dataset, and the
    pooled loss is their token-weighted combination, so forgetting of one source shows beside it.

    collate_fn/count_fn: the task's batching and supervised-unit count (default: causal LM tokens)."""
    sources = data["source"] if "source" in getattr(data, "column_names", ()) else []
    names = list(dict.fromkeys(sources))
    if len(names) < 2:
        return _eval_loss(loss_module, data, batch_size, pad_id, accelerator, collate_fn, count_fn)
    record, total, count = {}, 0.0, 0
    for name in names:
        part = data.select([i for i, s in enumerate(sources) if s == name])
        one = _eval_loss(loss_module, part, batch_size, pad_id, accelerator, collate_fn, count_fn)
        record[f"eval_loss/{name}"] = one["eval_loss"]
        total, count = total + one["eval_loss"] * one["eval_tokens"], count + one["eval_tokens"]
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count} | record


@torch.no_grad()
def _eval_loss(loss_module, data, batch_size: int, pad_id: int, accelerator=None, collate_fn=None, count_fn=None):
    from functools import partial

    collate_fn = collate_fn or partial(collate_padded, pad_id=pad_id)
    count_fn = count_fn or supervised_count
    accelerator = accelerator or _SingleProcess(next(loss_module.parameters()).device)
    was_training = loss_module.training
    loss_module.eval()
    lengths = example_lengths(data)
    # Longest first, in fixed batches: deterministic, little padding; ranks take every world-th batch.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    total, count = torch.zeros((), dtype=torch.float64), 0
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    # Every rank runs as many forwards: a sharded model (FSDP) gathers its weights collectively in each one,
    # so a rank with one batch fewer repeats a batch and discards it rather than leave the others waiting.
    rounds = -(-len(batches) // accelerator.num_processes)
    for n, idx in enumerate(mine + batches[: rounds - len(mine)]):
        batch = without_weights(collate_fn(rows(data, idx)))  # eval loss is the plain token mean, whatever the weights
        with accelerator.autocast():
            loss = loss_module(**{k: v.to(accelerator.device) for k, v in batch.items()}).double().cpu()
        if n < len(mine):
            total, count = total + loss, count + count_fn(batch)
    stats = torch.tensor([total.item(), float(count)], dtype=torch.float64, device=accelerator.device)
    total, count = accelerator.reduce(stats, "sum").tolist()
    loss_module.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}



class _SingleProcess:
    """The few Accelerator members eval_loss uses, for evaluation outside a training run."""

    process_index, num_processes = 0, 1

    def __init__(self, device):
        self.device = device

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def reduce(self, tensor, op):
        return tensor


@torch.no_grad()
def example_losses(loss_module, data, pad_id: int) -> list[tuple[float, int]]:
    """(loss sum, supervised tokens) of each example on its own: the per-item evidence behind the eval
    loss's interval (evaluate.significance); their token-weighted mean is the eval loss."""
    device = next(loss_module.parameters()).device
    was_training = loss_module.training
    loss_module.eval()
    out = []
    for i in range(len(data)):
        batch = without_weights(collate_padded(rows(data, [i]), pad_id))
        out.append((float(loss_module(**{k: v.to(device) for k, v in batch.items()})), supervised_count(batch)))
    loss_module.train(was_training)
    return out
