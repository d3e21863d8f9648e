"""The SFT loss: a sum of token cross-entropies over supervised tokens, normalized by the caller.

Returning a *sum* (not a mean) is the point: the training loop divides once by the supervised
tokens of the whole optimizer step (docs/correctness.md rule 3), so the loss does not depend on how
the step is cut into micro-batches, ranks or padded rows.

Per-example loss weights (the dataset's `loss_weight` column) live inside that one normalizer: a batch
with "loss_weights" (each position its example's weight) sums w_t * CE_t, and the task's count sums w_t,
so a step's loss is sum w_t CE_t / sum w_t over all its supervised tokens. Collate adds the key only when
some weight is not 1, so unweighted data runs the unweighted code below, bit for bit. Eval loss is
unweighted (sftlab.metrics.perplexity drops the key).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftlab.data.tokenize import IGNORE
from sftlab.model.precision import is_half

# Config attributes that make the LM head more than a plain linear layer; such models take the
# full-logits path so their logits are computed exactly as their own forward does.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 512) -> torch.Tensor:
    """Sum of cross-entropy over supervised tokens of one micro-batch (fp32 accumulation), each token's
    times its example's weight when the batch carries "loss_weights"."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    targets = labels[keep]
    weights = batch["loss_weights"][:, 1:][keep] if "loss_weights" in batch else None
    # padded: attention_mask; packed: position ids and segments. Labels and weights are the loss's, not the model's.
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    if _plain_head(model):
        # Run the LM head only where a token is supervised: the (tokens x vocab) logits of the
        # prompt are never computed, which saves most of the head's time and memory in SFT.
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return chunked_cross_entropy(hidden[:, :-1][keep], head, targets, chunk_tokens, weights)
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, logits.shape[1] - batch["labels"].shape[1] :]  # prompt tuning prepends virtual positions
    return _cross_entropy_sum(logits[:, :-1][keep], targets, weights)


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int,
                          weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Sum of CE(head(hidden), targets) (each times its row of `weights` if given), at most `chunk` rows
    of logits alive at a time.

    Each chunk's logits are freed after its forward and recomputed in backward (activation
    checkpointing of the head), so peak memory holds one (chunk x vocab) block instead of all of them.
    """
    from torch.utils.checkpoint import checkpoint

    parts = (hidden, targets) if weights is None else (hidden, targets, weights)
    chunks = list(zip(*(p.split(chunk) for p in parts)))
    if len(chunks) == 1 or not torch.is_grad_enabled():
        return sum(_cross_entropy_sum(head(h), *rest) for h, *rest in chunks)
    return sum(checkpoint(lambda h, *rest: _cross_entropy_sum(head(h), *rest), *c, use_reentrant=False) for c in chunks)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    if is_half(logits.dtype):  # softmax over a large vocab needs fp32
        logits = logits.float()
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum")
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


def _plain_head(model) -> bool:
    from sftlab.model.methods import is_prompt_learning

    if is_prompt_learning(model):  # virtual tokens enter through peft's own forward
        return False
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _HEAD_EXTRAS):
        return False
    try:
        return model.get_decoder() is not None and model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


class SupervisedLoss(torch.nn.Module):
    """The LM and its loss as one module: accelerate's DDP/FSDP wrappers then see the very forward
    that computes the loss (the fast path calls the decoder and head directly, not model.forward)."""

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = 512):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(self, **batch) -> torch.Tensor:
        return loss_sum(self.lm, batch, self.chunk_tokens)
