"""LoRA's update added inside the up-projection's matmul, for training.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`: the product, its scaled copy and the
sum are three tensors of the layer's full output size, written and read again, for every adapted
linear layer and again in backward. `addmm(result, h, B^T, alpha=scaling)` does the scaling and
the sum in the matmul's epilogue, one pass, one rounding; its backward scales only the rank-sized
gradients, which shortens a LoRA step on GPU (benchmarks/RESULTS.md). Plain LoRA on nn.Linear only:
DoRA and the other variants, biased or disabled adapters and several active adapters keep peft's
own forward.
"""

from __future__ import annotations

import torch


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant
            or kwargs.get("adapter_names") is not None or self.lora_B[active[0]].bias is not None):  # fmt: skip
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x, *args, **kwargs)
    lora_a = self.lora_A[name]
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                       self.lora_B[name].weight.t(), alpha=self.scaling[name])  # fmt: skip
    return flat.view(result.shape).to(result.dtype)


def use_for_training(model: torch.nn.Module) -> int:
    """Switch every plain LoRA linear layer of a peft model to the fused update; returns how many. A layer
    whose forward is already replaced on the instance (an accelerate hook) keeps it."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        plain = type(module) is Linear and isinstance(module.base_layer, torch.nn.Linear) and not module.fan_in_fan_out
        if plain and "forward" not in vars(module):
            module.forward = _forward.__get__(module)
            count += 1
    return count
