"""The weights an optimizer step updates, as the loop sees them: the model's own trainable parameters.

`sftlab.speed.masters.MasterWeights` is the other kind (fp32 copies of a bf16 model); both answer the
same calls, so the step has no branch on the precision path:

    begin_micro_batch(last)  before each backward       clip(max_norm) -> gradient norm (None: the engine clips)
    optimizer_step(opt)      the update                  zero_grad()    after the step
    after_load()             after a checkpoint loaded   release()      before the final model is saved
"""

from __future__ import annotations

import torch


class ModelWeights:
    def __init__(self, model: torch.nn.Module, accelerator):
        self.model = model
        self.accelerator = accelerator

    def named_parameters(self):
        return self.model.named_parameters()

    def parameters(self):
        return self.model.parameters()

    def begin_micro_batch(self, last: bool) -> None:
        pass

    def clip(self, max_norm: float) -> float | None:
        """Clip to max_norm and return the norm before clipping; None under DeepSpeed, which clips inside its engine."""
        params = [p for p in self.model.parameters() if p.requires_grad]  # after prepare(): FSDP's sharded ones
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()

    def zero_grad(self) -> None:
        pass

    def after_load(self) -> None:
        pass

    def release(self) -> None:
        pass
