"""Every decision about kernels, batch layout and precision path of a training run, in one place.

    configure(cfg, precision, single_process)   before the Accelerator exists: threads, the CPU
        heap, and the precision path (bf16 over fp32 masters, autocast, or plain fp32), which is what
        accelerate's mixed precision must be told
    Speed.apply(lm, accelerator, task)   on the model the method wrapped: attention kernel, RMSNorm, fused
        LoRA, gradient checkpointing, compile, the batch layout and FSDP2 sharding (train.sharding);
        returns the weights the optimizer steps (fp32 masters, the model's own, or its shards)

The loop reads the returned Speed and prints it once; it never asks which hardware it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftlab.config import FROZEN_BASE, PROMPT_LEARNING, Config
from sftlab.model.precision import half_dtype
from sftlab.speed import attention, cpu, lora_fused, masters, rmsnorm, sharding
from sftlab.speed.weights import ModelWeights


@dataclass
class Speed:
    """What was applied, for the start-of-run line, the summary and the loop."""

    cfg: Config
    precision: str  # fp32 | bf16 | fp16
    masters: bool  # the model computes in bf16 over fp32 master weights (sftlab.speed.masters)
    mixed_precision: str  # accelerate's autocast: no | bf16 | fp16
    early_optimizer_state: bool  # AdamW's state made before the first forward (sftlab.loop.optim.init_state)
    cpu: bool  # no GPU: accelerate places the run on the CPU
    threads: int
    heap: bool  # glibc keeps freed memory for the next step (CPU)
    attention: str = ""
    rmsnorm: int = 0  # norms switched to the lean RMSNorm
    lora_fused: int = 0  # LoRA layers with the update inside the matmul
    checkpointing: bool = False
    compiled: int = 0  # transformer blocks compiled
    layout: str = "padded"  # padded | packed | flat (sftlab.data.batching)
    sharded: int = 0  # transformer blocks FSDP2 shards (train.sharding=fsdp; sftlab.speed.sharding)
    shard_share: tuple[int, int] = (0, 0)  # parameter elements this rank holds, of the whole model's

    def apply(self, lm: torch.nn.Module, accelerator, task):
        """Switch the wrapped model to the fast paths that are exact for it; returns the weights to step."""
        cfg, decoder = self.cfg.train, task.causal_decoder
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        # Virtual-token methods run the model's own forward and attention (their keys outnumber the queries).
        fused = decoder and cfg.attention == "auto" and cfg.method not in PROMPT_LEARNING and attention.use_for_training(base)
        self.attention = attention.NAME if fused else base.config._attn_implementation
        self.rmsnorm, self.lora_fused = training_forwards(lm, decoder)
        if cfg.method in FROZEN_BASE and half_dtype(self.precision) is not None:
            _keep_adapter_inputs_in_compute_dtype(lm)
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.method in FROZEN_BASE:
                lm.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
            self.checkpointing = True
        if cfg.compile:  # before fully_shard, as torchtitan orders them: its hooks run around the compiled forward
            self.compiled = compile_blocks(lm)
        self.layout = batch_layout(self.cfg, fused, accelerator.device, self.precision, decoder)
        if cfg.sharding == "fsdp":  # last: the shards replace the parameters every path above set up
            root = task.loss_module(lm)  # the loop trains this very module (ShardedWeights.model)
            self.sharded = sharding.shard(root, lm, self.precision, accelerator.device,
                                          cfg.fsdp_reshard_after_forward, cfg.fsdp_blocks)
            self.shard_share = sharding.local_share(lm)
            return sharding.ShardedWeights(root, accelerator)
        if self.masters:  # the masters live beside the weights they update (prepare() would move only the model)
            lm.to(accelerator.device)
            return masters.MasterWeights(lm)
        return ModelWeights(lm, accelerator)

    def compute(self):
        """The precision path and attention kernel, as summary.json records them (speed.as_trained)."""
        from sftlab.speed.as_trained import Compute

        return Compute(self.precision, self.masters, self.mixed_precision, self.attention)

    def describe(self) -> str:
        sharded = " (fp32 shards)" if self.cfg.train.method == "full" else " (fp32 adapter shards, the base in its dtype)"
        path = " (fp32 master weights)" if self.masters else sharded if self.sharded else ""
        shards = f"; FSDP2 over {self.sharded} blocks" if self.sharded else ""
        compiled = f"; {self.compiled} blocks compiled" if self.compiled else ""
        return f"precision {self.precision}{path}; attention {self.attention}; batches {self.layout}{shards}{compiled}"


def training_forwards(model: torch.nn.Module, decoder: bool = True) -> tuple[int, int]:
    """Switch the modules training runs on sftlab.speed's own forwards to them: the lean RMSNorm (a decoder's
    Llama-style norms) and LoRA's update inside the matmul (plain LoRA layers); returns how many of each.
    Training and `sftlab eval` (speed.as_trained, for a decoder's eval loss) both call this one function."""
    return (rmsnorm.use_for_training(model) if decoder else 0), lora_fused.use_for_training(model)


def configure(cfg: Config, precision: str, single_process: bool) -> Speed:
    """Process-wide settings, and the precision path accelerate must be created with."""
    on_cpu = not torch.cuda.is_available()
    threads = cpu.use_cores()
    heap = cpu.keep_freed_memory() if on_cpu else False
    fsdp = cfg.train.sharding == "fsdp"
    use_masters = masters.applies(cfg, precision, single_process) and not fsdp
    # A bf16 model needs no autocast; under FSDP2 its mixed-precision policy casts the fp32 shards.
    mixed = "no" if use_masters or fsdp or precision == "fp32" else precision
    # FSDP and DeepSpeed lay the optimizer state out over their own flat shards.
    return Speed(cfg, precision, use_masters, mixed, single_process, on_cpu, threads, heap)


def batch_layout(cfg: Config, fused: bool, device, precision: str, decoder: bool = True) -> str:
    """'packed' (data.packing), 'flat' (one unpadded row a micro-batch) or 'padded'. Flat by default
    where the varlen kernel runs: every matmul then costs the real tokens only, not the padding up to
    the longest row. On CPU a padded batch keeps one batched attention call (and the short-row kernel)
    where a flat row takes one call per example."""
    if cfg.data.packing:
        return "packed"
    if cfg.data.padding_free == "auto":
        half = half_dtype(precision)
        on = fused and decoder and half is not None and attention.varlen_runs(device, half)
        return "flat" if on else "padded"
    return "flat" if cfg.data.padding_free else "padded"


def compile_blocks(lm) -> int:
    """torch.compile every transformer block (regional compilation): the layers share one compiled
    graph, so compile time is one block's, not the whole model's; lengths vary, so shapes are dynamic."""
    from sftlab.errors import ModelError

    block_types = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ModelError(f"train.compile: no transformer block found in {type(lm).__name__} (its _no_split_modules "
                         f"{sorted(block_types)}); train without train.compile")  # fmt: skip
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def _keep_adapter_inputs_in_compute_dtype(lm) -> None:
    # peft copies every adapter input to the adapter's fp32 dtype; under autocast that copy is pure
    # overhead (the matmul runs in bf16 anyway), and it is one activation-sized copy per adapted layer.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
