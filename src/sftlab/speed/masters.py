"""bf16 compute with fp32 master weights, for training every weight of a model on one process.

Under autocast the weights stay fp32 and every op casts them (and its fp32 activations) to bf16
again: one weight copy a forward, one activation copy per consumer (q, k and v each cast the same
normed input), and an fp32 residual stream. Keeping the model itself in bf16 removes those copies
(faster, fewer activations; benchmarks/RESULTS.md), while the optimizer updates fp32 copies so
small updates are not lost to bf16 rounding.

Gradients: the last micro-batch of a step leaves its bf16 gradients on the model; earlier ones
(gradient accumulation) are added into fp32 as each is ready (a post-accumulate hook), so
accumulation is fp32. The optimizer step then converts, clips and applies them a cache-sized piece
at a time: fp32 gradients of the whole model never exist at once.
"""

from __future__ import annotations

import math

import torch

PIECE_ELEMENTS = 1 << 19  # on CPU: one 2 MB fp32 gradient buffer, reused from the heap while in cache
CHUNK_ELEMENTS = 32 << 20  # on GPU, where allocation is cached and launches cost: 128 MB of fp32 gradients
NORM_SLICE = 1 << 20  # on CPU: the gradient norm's fp32 slice (4 MB), the fastest size measured (benchmarks/RESULTS.md)


class MasterWeights:
    """fp32 copies of a model's parameters, which become bf16; the optimizer and checkpoints use these.

    Quacks like a module for `named_parameters()`/`parameters()`, so the optimizer builder and the
    checkpoint code treat it exactly as they treat a model's own trainable parameters."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self._param = {id(m): p for p, m in zip(self.params, self.masters)}
        self.last_micro_batch = True  # set by the loop before each backward
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(m)) for p, m in zip(self.params, self.masters)]
        for p in self.params:  # parameters only: buffers such as rotary frequencies stay fp32
            p.data = p.data.to(dtype)
        self.sparse_lookup = _sparse_tied_lookup(model)

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

    # The loop's calls (sftlab.speed.weights names them all).

    def begin_micro_batch(self, last: bool) -> None:
        self.last_micro_batch = last

    def clip(self, max_norm: float) -> float:
        """The step's gradient norm; the step then scales by the clip factor clip_grad_norm_ would use."""
        norm = self.grad_norm()
        self._clip_factor = min(1.0, max_norm / (norm + 1e-6))
        return norm

    def optimizer_step(self, optimizer) -> None:
        # The masters step as the optimizer's closure, so its hooks and the LR scheduler see a step.
        optimizer.step(lambda: self.step(optimizer, self._clip_factor))

    def after_load(self) -> None:
        self.sync()

    def named_parameters(self):
        return zip(self.names, self.masters)

    def parameters(self):
        return iter(self.masters)

    def grad_norm(self) -> float:
        """The L2 norm of the step's whole gradient, summed in fp32 (what clip_grad_norm_ would compute)."""
        squares, buffer = [], torch.empty(NORM_SLICE, dtype=torch.float32)  # for bf16 gradients on CPU
        for p, m in zip(self.params, self.masters):
            if m.grad is not None and p.grad is not None:  # accumulated micro-batches plus the last one
                m.grad.add_(p.grad)
                p.grad = None
            g = m.grad if m.grad is not None else p.grad
            if g is not None:
                squares += _squares(g, buffer)
        return math.sqrt(float(torch.stack(squares).double().sum())) if squares else 0.0

    @torch.no_grad()
    def step(self, optimizer: torch.optim.AdamW, scale: float) -> None:
        """One fused AdamW step of the masters (gradients times `scale`, the clip factor), then the
        updated masters rounded into the model's bf16 weights.

        Written out because torch's optimizer steps whole parameters: the fp32 gradient it needs is a
        fresh block per parameter (on CPU a large one, such as the embedding's, is mmapped and its pages
        fault in every step; benchmarks/RESULTS.md). Here each
        piece of <= PIECE elements is converted into a small buffer that stays in cache, stepped by the
        same fused kernel and copied back while hot. The state (step, exp_avg, exp_avg_sq) is torch's own,
        so optimizer.state_dict() and checkpoints are unchanged."""
        piece = step_elements(self.params[0].device.type)
        for group in optimizer.param_groups:
            if not group.get("fused") or group.get("amsgrad") or group.get("maximize"):
                raise ValueError("MasterWeights steps a fused AdamW without amsgrad or maximize (sftlab.loop.optim)")
            live = [(self._param[id(m)], m) for m in group["params"] if self._grad(m) is not None]
            steps = [adamw_state(optimizer, m)["step"] for _, m in live]
            if steps:
                torch._foreach_add_(steps, 1)
            for batch in _batches(live, piece):
                self._step_pieces(optimizer, group, batch, scale)
        self.zero_grad()

    def _step_pieces(self, optimizer, group, batch, scale: float) -> None:
        buffer = torch.empty(sum(hi - lo for _, _, lo, hi in batch), dtype=torch.float32, device=batch[0][1].device)
        masters, grads, avgs, squares, steps, at = [], [], [], [], [], 0
        for _, m, lo, hi in batch:
            state = optimizer.state[m]
            grads.append(buffer[at : at + hi - lo])
            grads[-1].copy_(self._grad(m).view(-1)[lo:hi])
            at += hi - lo
            masters.append(m.view(-1)[lo:hi])
            avgs.append(state["exp_avg"].view(-1)[lo:hi])
            squares.append(state["exp_avg_sq"].view(-1)[lo:hi])
            steps.append(state["step"])
        if scale != 1.0:
            buffer.mul_(scale)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            masters, grads, avgs, squares, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )
        for (p, _, lo, hi), m in zip(batch, masters):
            p.view(-1)[lo:hi].copy_(m)

    def _grad(self, master: torch.Tensor) -> torch.Tensor | None:
        """The step's gradient: fp32 on the master when micro-batches were accumulated, else bf16 on the model."""
        return master.grad if master.grad is not None else self._param[id(master)].grad

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = m.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        """Round the fp32 masters into the model's bf16 weights (after loading a checkpoint)."""
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    def release(self) -> None:
        """Put the fp32 masters back into the model as its weights (for saving the final model)."""
        for h in self.hooks:
            h.remove()
        if self.sparse_lookup is not None:
            self.sparse_lookup.sparse = False
        for p, m in zip(self.params, self.masters):
            p.data = m.detach()
        self.hooks = []


def step_elements(device_type: str) -> int:
    """How many parameters the step converts to fp32 at a time on this device (the planner counts it too)."""
    return PIECE_ELEMENTS if device_type == "cpu" else CHUNK_ELEMENTS


def _sparse_tied_lookup(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """On CPU, let a tied input embedding return a sparse gradient: autograd then adds it in place into
    the LM head's dense one, instead of zero-filling a (vocab x hidden) block for the lookup's gradient
    and summing the two into a third (blocks above the mmap ceiling, whose pages fault in every step;
    benchmarks/RESULTS.md). Untied, the sparse gradient would reach the optimizer, which takes dense ones."""
    lookup = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(lookup, torch.nn.Embedding) and head is not None and head.weight is lookup.weight
    if not tied or lookup.weight.device.type != "cpu" or not lookup.weight.requires_grad:
        return None
    lookup.sparse = True
    return lookup


def _batches(live, piece: int):
    """(param, master, lo, hi) flat ranges of at most `piece` elements, grouped into batches of about
    `piece` elements: a large parameter is cut, small ones share one kernel call."""
    batch, size = [], 0
    for p, m in live:
        for lo in range(0, m.numel(), piece):
            hi = min(lo + piece, m.numel())
            if batch and size + hi - lo > piece:
                yield batch
                batch, size = [], 0
            batch.append((p, m, lo, hi))
            size += hi - lo
    if batch:
        yield batch


def _squares(grad: torch.Tensor, buffer: torch.Tensor) -> list[torch.Tensor]:
    """The gradient's squared L2 norm in fp32, in one or more partial sums."""
    if grad.device.type != "cpu" or grad.dtype == torch.float32:
        return [torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2]
    # On CPU vector_norm(dtype=float32) of bf16 converts at a fraction of copy speed, even in slices;
    # a cache-sized fp32 copy and a dot are faster (benchmarks/RESULTS.md).
    sums = []
    for piece in grad.reshape(-1).split(NORM_SLICE):
        f = buffer[: piece.numel()].copy_(piece)
        sums.append(torch.dot(f, f))
    return sums


def applies(cfg, precision: str, single_process: bool) -> bool:
    """Full fine-tuning of a causal LM in bf16 on one process. Adapters already train in fp32 over a
    bf16 base; `freeze` would round its frozen layers to bf16 in the saved model, having no masters
    for them; DDP/FSDP/DeepSpeed own their gradients and mixed precision."""
    return cfg.task == "causal_lm" and precision == "bf16" and cfg.train.method == "full" and single_process


def adamw_state(optimizer: torch.optim.AdamW, p: torch.Tensor) -> dict:
    """The parameter's state in a fused AdamW, created as torch creates it (so checkpoints match)."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state
