"""Checkpoints that resume the exact run: trainable weights, optimizer, scheduler, RNG, data position.

Durability (docs/correctness.md, rule 6): a checkpoint is written into a temporary directory, every
file and the directory are fsynced, then it is renamed into place and the parent fsynced
(`files.atomic_dir`); older checkpoints are deleted only after that. Its last file, manifest.json,
holds each file's size and sha256; a resume verifies them and falls back to the newest checkpoint
that verifies, saying what was wrong with the newer ones. Every file loads with
`torch.load(weights_only=True)` (RNG states are stored as tensors and plain containers), so a
checkpoint from a shared directory cannot run code.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sftlab.errors import CheckpointError
from sftlab.files import atomic_dir, file_digest

PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "config.yaml", "state.json")
# A sharded checkpoint (train.sharding=fsdp): Distributed Checkpoint's shards and their index, one RNG per rank.
SHARD_INDEX = ".metadata"
REQUIRED_SHARDED = (SHARD_INDEX, "scheduler.pt", "config.yaml", "state.json")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain containers (what weights_only loads)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- writing


def save(root: Path, step: int, model, optimizer, scheduler, state: dict, config_yaml: str, keep: int,
         method_state: dict | None = None) -> Path:  # fmt: skip
    """Write checkpoint `step` durably, then drop the oldest beyond `keep` (0 keeps all).

    `method_state`: what a training method keeps outside its parameters (AdaLoRA's importance scores)."""
    final = root / f"{PREFIX}{step:07d}"
    before = [p for p in checkpoints(root) if p.name < final.name]
    kept = f"the last checkpoint, {before[-1]}, is kept" if before else "there is no earlier checkpoint"
    weights, optim = trainable_state(model), optimizer.state_dict()
    writing = atomic_dir(final, replace=True, durable=True)
    with full_disk_stops(root, f"checkpoint {final.name}", kept, tensor_bytes([weights, optim])), writing as tmp:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        if method_state is not None:
            torch.save(method_state, tmp / "method.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
    if keep > 0:  # the new one is on disk: the older ones may go
        older = [p for p in checkpoints(root) if p.name < final.name]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded(root: Path, step: int, model, optimizer, scheduler, state: dict, config_yaml: str, keep: int) -> Path:
    """Checkpoint `step` of a sharded model with Distributed Checkpoint; every rank calls it. Each rank writes
    its own shards of the trainable weights and optimizer state (nothing gathered; a frozen base is not
    saved, as save() saves none) and its RNG; rank 0 the scheduler, state and manifest, then renames the
    directory into place as save() does. A failure on any rank is raised on every rank (none is left
    waiting in a collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, final = dist.get_rank(), root / f"{PREFIX}{step:07d}"
    weights, optim = get_state_dict(model, optimizer, options=trainable_only())
    if rank != 0:
        tmp = Path(_raise_any(_broadcast(None)))  # rank 0's temporary directory, or the error it met first
        _raise_any(_all_errors(_attempt(_write_shards, tmp, weights, optim, rank)))
        _raise_any(_broadcast(None))  # rank 0 completed the checkpoint, or says why not
        return final
    before = [p for p in checkpoints(root) if p.name < final.name]
    kept = f"the last checkpoint, {before[-1]}, is kept" if before else "there is no earlier checkpoint"
    told = None  # which broadcast the other ranks wait in: "start", then "done"
    try:
        with full_disk_stops(root, f"checkpoint {final.name}", kept, tensor_bytes([weights, optim])), \
                atomic_dir(final, replace=True, durable=True) as tmp:  # fmt: skip
            _broadcast({"ok": str(tmp)})
            told = "start"
            _raise_any(_all_errors(_attempt(_write_shards, tmp, weights, optim, rank)))
            told = "shards"
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
            (tmp / "state.json").write_text(json.dumps(state | {"ranks": dist.get_world_size()}, indent=1))
            write_manifest(tmp)
    except Exception as e:
        if told in (None, "shards"):  # the others wait for the start, or for the end: tell them
            _broadcast({"error": f"rank 0: {e}"})
        raise
    _broadcast({"ok": str(final)})
    if keep > 0:
        older = [p for p in checkpoints(root) if p.name < final.name]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def trainable_only(restoring: bool = False):
    """get_state_dict's options for checkpoints: the trainable parameters only (a LoRA's frozen base is not
    saved; training rebuilds it from the base model, as for whole checkpoints). Restoring them leaves the
    frozen ones as they are (not strict): dcp.load has already failed on any trainable key it lacks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=not restoring)


def _broadcast(message: dict | None) -> dict:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _attempt(fn, *args) -> str | None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- told to every rank by _all_errors, then raised
        return f"rank {args[-1]}: {type(e).__name__}: {e}"
    return None


def _all_errors(mine: str | None) -> dict:
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    errors = [e for e in every if e]
    return {"error": "; ".join(errors)} if errors else {"ok": None}


def _raise_any(message: dict):
    if "error" in message:
        raise CheckpointError(f"the sharded checkpoint was not written: {message['error']}")
    return message["ok"]


def _write_shards(tmp: Path, weights: dict, optim: dict, rank: int) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp))  # collective: each rank its shards
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")


def write_manifest(path: Path) -> None:
    """manifest.json, written last: each file's size and sha256. sha256 rather than a faster checksum:
    it is in the standard library, hardware-accelerated (SHA-NI, ARMv8) at about the speed the disk
    reads the files back, and a user can check a copied checkpoint with `sha256sum`."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}  # fmt: skip
    (path / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in nested dicts and lists: about what saving them writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(x) for x in items)


@contextmanager
def full_disk_stops(directory: Path, what: str, kept: str, needed: int):
    """A full disk (or quota) for writing `what` (about `needed` bytes) in `directory` through atomic_dir,
    which removes the partial directory, becomes one clear error naming the directory, its free space
    and what is `kept`: before writing when the space is plainly short, else when the write fails."""
    if _free(directory) < needed:
        raise _full(directory, what, kept, needed, written=False)
    try:
        yield
    except Exception as e:
        # torch.save's writer reports a full disk without its errno ("file write failed"): the free space tells
        if not (_disk_full(e) or (isinstance(e, (OSError, RuntimeError)) and _free(directory) < needed)):
            raise
        raise _full(directory, what, kept, needed, written=True) from None


def _full(directory: Path, what: str, kept: str, needed: int, written: bool) -> CheckpointError:
    failed = f"writing {what} in {directory} failed" if written else f"{what} needs {_size(needed)} in {directory}"
    removed = f"The partial {what} was removed and {kept}" if written else f"Nothing was written and {kept}"
    return CheckpointError(f"the disk is full: {failed} ({_size(_free(directory))} free there). {removed}. Free "
                           "space (or lower train.save_total_limit), then continue with `sftlab train CONFIG --resume`.")  # fmt: skip


def _free(directory: Path) -> int:
    while not directory.exists() and directory != directory.parent:  # checkpoints/ before its first save
        directory = directory.parent
    return shutil.disk_usage(directory).free


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)  # safetensors reports the OS error in its own exception type
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded"))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- choosing and reading


def checkpoints(root: Path) -> list[Path]:
    """Every checkpoint directory, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())


def problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (missing file, size or hash mismatch, no manifest,
    unreadable state.json), or None when every file matches its manifest."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its save was cut off, or an sftlab without manifests wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name in REQUIRED_SHARDED if SHARD_INDEX in files else REQUIRED:
        if name not in files:
            return f"{MANIFEST} lists no {name}"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} is {file.stat().st_size} bytes, its manifest says {want['size']}"
        if file_digest(file) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    try:
        json.loads((path / "state.json").read_text())
    except ValueError as e:
        return f"state.json is unreadable ({e})"
    return None


def newest_verified(root: Path, say=print) -> Path:
    """The newest checkpoint in `root` whose files match its manifest; each newer one that does not is
    named with what is wrong (and left in place: a resumed run overwrites it when it reaches its step)."""
    found = checkpoints(root)
    if not found:
        raise CheckpointError(f"--resume: no complete checkpoint in {root}; run without --resume")
    rejected = []
    for path in reversed(found):
        why = problem(path)
        if why is None:
            for bad, reason in rejected:
                say(f"skipping checkpoint {bad}: {reason}; resuming from the older {path.name}")
            return path
        rejected.append((path, why))
    lines = "\n".join(f"  {p}: {why}" for p, why in rejected)
    raise CheckpointError(f"--resume: no complete checkpoint in {root} verifies against its manifest:\n{lines}\n"
                          "Start a new run (--overwrite), or restore a checkpoint copied elsewhere.")  # fmt: skip


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved in `path`; returns the loop state. RNG is restored last."""
    with _reading(path / "trainable.safetensors"):
        load_trainable(model, load_file(path / "trainable.safetensors"))
    with _reading(path / "optimizer.pt"):
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    with _reading(path / "scheduler.pt"):
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    with _reading(path / "rng.pt"):
        set_rng_state(_torch_load(path / "rng.pt"))
    with _reading(path / "state.json"):
        state = json.loads((path / "state.json").read_text())
    state.pop("ranks", None)  # for the resume check (train._reshaped_for_ranks), not the loop
    return state


def is_sharded(path: Path) -> bool:
    return (path / SHARD_INDEX).is_file()


def load_sharded(path: Path, model, optimizer, scheduler, masters: bool = False) -> dict:
    """Restore a sharded checkpoint on every rank, each reading the shards it holds now: on the ranks that
    wrote it, or on another number of them (even one process, unsharded), Distributed Checkpoint resharding.
    A rank beyond those that wrote it takes rank 0's RNG (only dropout draws from it)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if masters:
        raise CheckpointError(f"{path}: a sharded checkpoint holds the fp32 weights themselves; resume it with "
                              "train.sharding=fsdp, or on one process with train.precision=fp32")  # fmt: skip
    with _reading(path / "state.json"):
        state = json.loads((path / "state.json").read_text())
    state.pop("ranks", None)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    weights, optim = get_state_dict(model, optimizer, options=trainable_only())
    with _reading(path / SHARD_INDEX):
        dcp.load({"model": weights, "optim": optim}, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                       options=trainable_only(restoring=True))  # fmt: skip
    with _reading(path / "scheduler.pt"):
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    rng = path / f"rng-{rank}.pt" if (path / f"rng-{rank}.pt").is_file() else path / "rng-0.pt"
    with _reading(rng):
        set_rng_state(_torch_load(rng))
    return state


def load_method_state(path: Path) -> dict | None:
    return _torch_load(path / "method.pt") if (path / "method.pt").is_file() else None


def _torch_load(file: Path):
    """torch.load with weights_only=True: a file holding other objects is refused, never unpickled."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        raise CheckpointError(
            f"{file}: refused to load: it holds Python objects other than tensors and plain containers, which "
            f"unpickling would execute{f' ({detail})' if detail else ''}. sftlab never writes such files; "
            "resume only from checkpoints you trust, or start a new run."
        ) from None
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {str(e)[:300]})") from None


@contextmanager
def _reading(file: Path):
    """A file that verified but does not fit this run (another model, another optimizer) as one clear error."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot be restored ({type(e).__name__}: {str(e)[:300]})") from None
