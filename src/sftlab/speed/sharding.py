"""train.sharding: fsdp — PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) applied by sftlab, apart
from the model code and the loop (as torchtitan does), on any process group: NCCL on GPUs, gloo on CPUs.

Each transformer block (the model's `_no_split_modules`) is one FSDP unit, the rest of the model the root
unit; parameters stay fp32 where they are sharded (the masters) and, under bf16, are cast for compute by
FSDP's mixed-precision policy, with gradients reduced in fp32. The reduce-scatter averages over ranks as
DDP's all-reduce does, so the loop's scale (ranks / the step's supervised tokens) is the same for both.
"""

from __future__ import annotations

import contextlib

import torch

from sftlab.errors import ConfigError, ModelError
from sftlab.speed.weights import ModelWeights


def transformer_blocks(lm: torch.nn.Module, names: list[str] | tuple[str, ...] = ()) -> list[torch.nn.Module]:
    """The repeated blocks a decoder is made of: modules of the classes `names` (train.fsdp_blocks), by default
    those the model declares unsplittable."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    wanted = set(names or getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in wanted]
    present = {type(m).__name__ for m in lm.modules()}
    if names and not wanted <= present:
        raise ModelError(f"train.fsdp_blocks: {sorted(wanted - present)} not in {type(base).__name__}; its blocks "
                         f"are {sorted(getattr(base, '_no_split_modules', None) or [])}")  # fmt: skip
    if not blocks:
        raise ModelError(f"train.sharding=fsdp: no transformer block found in {type(base).__name__} (its "
                         f"_no_split_modules {sorted(wanted)}); name them in train.fsdp_blocks, or train with "
                         "train.sharding=none")  # fmt: skip
    return blocks


def shard(root: torch.nn.Module, lm: torch.nn.Module, precision: str, device, reshard_after_forward: bool = True,
          block_names: list[str] | tuple[str, ...] = ()) -> int:
    """fully_shard every block of `lm`, then `root`, the module whose forward computes the loss (the loss
    module: its forward calls the decoder and the head directly, so the root unit holding embeddings,
    final norm and head, tied weights as one parameter, must be the module called). Returns the number
    of blocks; the modules are changed in place. `reshard_after_forward` False keeps each block's gathered
    weights from its forward to its backward (one all-gather per micro-batch instead of two, more memory).

    Only rank 0 holds the weights (read once); the other ranks built the model on the meta device and
    receive their shards, and every buffer, from it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("train.sharding=fsdp needs a process group: train through sftlab.loop.train.train, "
                          "or launch with `torchrun --nproc_per_node N -m sftlab train CONFIG`")  # fmt: skip
    # Rank 0's tensors, kept (on the CPU) until they are scattered; fully_shard moves one unit at a time to the
    # device, so no rank ever holds the whole model there.
    whole = root.state_dict() if dist.get_rank() == 0 else {}
    blocks = transformer_blocks(lm, block_names)
    for block in reversed(blocks):  # inner units first, as fully_shard requires, where named classes nest
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if dist.get_rank() != 0:  # rank 0's shards and buffers fully_shard moved to the device already
        root.to_empty(device=device)  # storage for this rank's shards; filled below
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(root, whole, options=options)
    for buffer in root.buffers():  # non-persistent ones too (rotary frequencies), which no state dict holds
        dist.broadcast(buffer.data, src=0)
    return len(blocks)


@contextlib.contextmanager
def one_rank_group(needed: bool, cuda: bool):
    """A process group of one rank for a sharded run no launcher started (FSDP2 and Distributed Checkpoint
    work on a group: one process then runs the very code path of N, its shards whole); removed after. Under
    a launcher, even of one process, accelerate makes (and keeps) the group."""
    import torch.distributed as dist

    if not needed or not dist.is_available() or dist.is_initialized():
        yield
        return
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"train.sharding=fsdp: could not make a one-rank {backend} process group ({e}); launch "
                          "with `torchrun --nproc_per_node 1 -m sftlab train CONFIG`") from None  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def unsharded_root(root: torch.nn.Module):
    """The root unit's own weights (embeddings, final norm, head) gathered for calls that go around its
    forward, such as generate() on the decoder inside it; the blocks gather theirs as they run."""
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def local_share(lm: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): what sharding saves, measured."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in lm.parameters())
    return local, sum(p.numel() for p in lm.parameters())


def full_state_dict(root: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of the sharded `root` (its trained parameters only, with `trainable_only`) on
    rank 0, on the CPU (gathered unit by unit; empty on the other ranks). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(root, options=options)


class ShardedWeights(ModelWeights):
    """The model's own (sharded) parameters: gradients synchronized on the last micro-batch only, and the
    norm for clipping taken over every rank's shard."""

    def __init__(self, model: torch.nn.Module, accelerator):
        from torch.distributed.fsdp import FSDPModule

        super().__init__(model, accelerator)
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def begin_micro_batch(self, last: bool) -> None:
        for unit in self.units:  # reduce-scatter once a step, not once a micro-batch
            unit.set_requires_gradient_sync(last, recurse=False)

    def clip(self, max_norm: float) -> float | None:
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm


# accelerate's ParallelismConfig sizes (accelerate/utils/launch.py): other parallelisms than data parallel.
_PARALLELISMS = {"DP_REPLICATE_SIZE": "dp_replicate_size (HSDP)", "TP_SIZE": "tp_size", "CP_SIZE": "cp_size",
                 "SP_SIZE": "sp_size"}  # fmt: skip


def from_accelerate(env) -> dict | None:
    """The train settings an accelerate FSDP config asks for, read from what `accelerate launch --config_file
    fsdp.yaml` puts in the environment (accelerate/utils/launch.py), so that it trains on sftlab's FSDP2: one
    engine, with resumable sharded checkpoints, on CPUs as on GPUs. None where no FSDP was asked for; what
    this FSDP does not do is refused, never dropped. Only what differs from sftlab's defaults is taken (accelerate
    writes every option, set or not), so a run YAML's train.fsdp_* keys stand unless the config changes them."""
    parallel = [name for key, name in _PARALLELISMS.items() if _size(env.get(f"PARALLELISM_CONFIG_{key}")) > 1]
    if parallel and env.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").strip().lower() == "true":
        raise ConfigError(f"the accelerate config's parallelism_config sets {', '.join(parallel)}: sftlab trains data "
                          "parallel only (DDP, or FSDP2 with train.sharding=fsdp); remove it")  # fmt: skip
    if _flag(env, "ACCELERATE_USE_FSDP") is not True:
        return None
    reshard, policy = _flag(env, "FSDP_RESHARD_AFTER_FORWARD", True), env.get("FSDP_AUTO_WRAP_POLICY", "").upper()
    refused = [why for bad, why in (
        (env.get("FSDP_VERSION", "1").strip() != "2", f"fsdp_version {env.get('FSDP_VERSION', '1')} (FSDP1): set "
                                                      "fsdp_version: 2"),
        (reshard is None, f"fsdp_reshard_after_forward {env.get('FSDP_RESHARD_AFTER_FORWARD')}: FSDP2 takes true "
                          "or false"),
        (policy not in ("", "NONE", "TRANSFORMER_BASED_WRAP"), f"fsdp_auto_wrap_policy {policy}: sftlab shards per "
                                                                 "transformer block (TRANSFORMER_BASED_WRAP)"),
        (_flag(env, "FSDP_OFFLOAD_PARAMS") is not False, "fsdp_offload_params: no CPU offload here"),
        (_flag(env, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD") is not False, "fsdp_activation_checkpointing_offload"),
        (_flag(env, "FSDP_ACTIVATION_CHECKPOINTING") is None, "fsdp_activation_checkpointing: true or false"),
        (bool(env.get("FSDP_IGNORED_MODULES", "").strip()), "fsdp_ignored_modules"),
    ) if bad]  # fmt: skip
    if refused:
        raise ConfigError("the accelerate config's fsdp_config asks for what sftlab's FSDP2 (train.sharding=fsdp) "
                          f"does not do: {'; '.join(refused)}. Change those keys, or launch with `torchrun "
                          "--nproc_per_node N -m sftlab train CONFIG train.sharding=fsdp`")  # fmt: skip
    blocks = [name.strip() for name in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    settings = {"sharding": "fsdp"}
    settings |= {"fsdp_reshard_after_forward": False} if reshard is False else {}
    settings |= {"fsdp_blocks": blocks} if blocks else {}
    settings |= {"gradient_checkpointing": True} if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING") else {}
    return settings


def _flag(env, name: str, default: bool = False) -> bool | None:
    """A boolean accelerate wrote (it writes an unset option as "None"); None where the value is not one."""
    from accelerate.utils import str_to_bool

    value = env.get(name, "").strip()
    if value in ("", "None"):
        return default
    try:
        return str_to_bool(value, to_bool=True)
    except ValueError:
        return None


def _size(value: str | None) -> int:
    return int(value) if value and value.strip().lstrip("-").isdigit() else 1
