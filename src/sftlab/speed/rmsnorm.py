"""RMSNorm for training that keeps only its input and one scale per token for backward.

The models' own RMSNorm (Llama and the many "copied from Llama") upcasts its input to fp32 and
autograd then keeps that fp32 copy and the normalized bf16 output: 3x the input's size per norm,
two norms a layer, a sizeable share of a bf16 block's activations (benchmarks/RESULTS.md). This one
recomputes the normalized input in backward instead. It replaces a norm's forward only where that
forward is Llama's, line for line. On CUDA PyTorch's fused RMSNorm kernel does the same in one pass
each way.
"""

from __future__ import annotations

import functools
import inspect

import torch


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 as the models do; fp64 stays fp64
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)  # the models' own rounding, step for step

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.to(rstd.dtype) * n.to(x.dtype)).sum(dim=tuple(range(dy.dim() - 1))).to(weight.dtype)
        dn = dy.to(rstd.dtype) * weight
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.is_cuda and hidden_states.dtype == self.weight.dtype:
        # PyTorch's fused CUDA kernel saves the same (input, one scale per token) in one pass each way;
        # the elementwise version above is slow on GPU (benchmarks/RESULTS.md). It rounds once where
        # the models round twice: the same within bf16's precision.
        return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


@functools.cache
def _is_llama_norm(cls: type) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    try:
        return inspect.getsource(cls.forward) == inspect.getsource(LlamaRMSNorm.forward)
    except (OSError, TypeError):
        return False


def use_for_training(model: torch.nn.Module) -> int:
    """Switch every Llama-style RMSNorm of the model to the lean one; returns how many. A norm whose forward
    is already replaced on the instance (an accelerate hook under a device_map) keeps it."""
    count = 0
    for module in model.modules():
        llama_norm = type(module).__name__.endswith("RMSNorm") and _is_llama_norm(type(module))
        if llama_norm and "forward" not in vars(module):
            module.forward = _forward.__get__(module)
            count += 1
    return count
