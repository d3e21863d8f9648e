"""bf16 compute with fp32 master weights, for training every weight of a model on one process.

Under autocast the weights stay fp32 and every op casts them (and its fp32 activations) to bf16
again: one weight copy a forward, one activation copy per consumer (q, k and v each cast the same
normed input), and an fp32 residual stream. Keeping the model itself in bf16 removes those copies
(faster, fewer activations; benchmarks/RESULTS.md), while the optimizer updates fp32 copies so
small updates are not lost to bf16 rounding.

Gradients: the last micro-batch of a step leaves its bf16 gradients on the model; earlier ones
(gradient accumulation) are added into fp32 as each is ready (a post-accumulate hook), so
accumulation is fp32. The optimizer step then converts, clips and applies them a chunk of
parameters at a time: fp32 gradients of the whole model never exist at once.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 32 << 20  # parameters converted and stepped together (128 MB of fp32 gradients)


class MasterWeights:
    """fp32 copies of a model's parameters, which become bf16; the optimizer and checkpoints use these.

    Quacks like a module for `named_parameters()`/`parameters()`, so the optimizer builder and the
    checkpoint code treat it exactly as they treat a model's own trainable parameters."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.last_micro_batch = True  # set by the loop before each backward
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(m)) for p, m in zip(self.params, self.masters)]
        for p in self.params:  # parameters only: buffers such as rotary frequencies stay fp32
            p.data = p.data.to(dtype)

    def _hook(self, master: torch.Tensor):
        def accumulate(param: torch.Tensor) -> None:
            if self.last_micro_batch:
                return  # stays bf16 on the model until the step
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

        return accumulate

    def named_parameters(self):
        return zip(self.names, self.masters)

    def parameters(self):
        return iter(self.masters)

    def grad_norm(self) -> float:
        """The L2 norm of the step's whole gradient, summed in fp32 (what clip_grad_norm_ would compute)."""
        squares = []
        for p, m in zip(self.params, self.masters):
            if m.grad is not None and p.grad is not None:  # accumulated micro-batches plus the last one
                m.grad.add_(p.grad)
                p.grad = None
            g = m.grad if m.grad is not None else p.grad
            if g is not None:
                squares += [torch.linalg.vector_norm(s, dtype=torch.float32) ** 2 for s in _slices(g)]
        return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0

    def step(self, optimizer, scale: float) -> None:
        """Apply the optimizer to the masters a chunk at a time (gradients times `scale`, the clip
        factor), then round the updated masters into the model's bf16 weights."""
        for chunk in self._chunks():
            for p, m in chunk:
                if m.grad is None and p.grad is not None:
                    m.grad = p.grad.float()
                p.grad = None
                if m.grad is not None and scale != 1.0:
                    m.grad.mul_(scale)
            optimizer.step()  # steps only the parameters that have a gradient: this chunk's
            with torch.no_grad():
                for p, m in chunk:
                    m.grad = None
                    p.copy_(m)

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = m.grad = None

    def _chunks(self):
        chunk, size = [], 0
        for pair in zip(self.params, self.masters):
            chunk.append(pair)
            size += pair[1].numel()
            if size >= CHUNK_ELEMENTS:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @torch.no_grad()
    def sync(self) -> None:
        """Round the fp32 masters into the model's bf16 weights (after loading a checkpoint)."""
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    def release(self) -> None:
        """Put the fp32 masters back into the model as its weights (for saving the final model)."""
        for h in self.hooks:
            h.remove()
        for p, m in zip(self.params, self.masters):
            p.data = m.detach()
        self.hooks = []


def _slices(grad: torch.Tensor) -> list[torch.Tensor]:
    # On CPU vector_norm(dtype=float32) first converts a bf16 tensor whole, at a fraction of copy
    # speed (~180 ms a step for SmolLM2-135M); cache-sized slices convert ~6x faster and allocate little.
    if grad.device.type != "cpu" or grad.dtype == torch.float32:
        return [grad]
    return list(grad.reshape(-1).split(1 << 20))


def applies(cfg, precision: str, single_process: bool) -> bool:
    """Full fine-tuning of a causal LM in bf16 on one process. Adapters already train in fp32 over a
    bf16 base; `freeze` would round its frozen layers to bf16 in the saved model, having no masters
    for them; DDP/FSDP/DeepSpeed own their gradients and mixed precision."""
    return cfg.task == "causal_lm" and precision == "bf16" and cfg.train.method == "full" and single_process
