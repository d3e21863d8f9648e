"""A checkpoint as the model a finished run leaves: for exporting (or chatting with) a run that stopped
before its end, sharded (train.sharding=fsdp, Distributed Checkpoint) or whole.

The model is built as training built it (the base and the method's wrapping, on one process, unsharded),
the checkpoint's trainable weights loaded into it, and the result written as the run writes its final
model: adapter or full weights, tokenizer with the training template, and the run's config.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftlab import rundir
from sftlab.errors import CheckpointError
from sftlab.loop import checkpoint


def is_checkpoint(path: Path) -> bool:
    """A directory `sftlab train` wrote under RUN/checkpoints/ (its manifest and loop state)."""
    path = Path(path)
    return (path / checkpoint.MANIFEST).is_file() and (path / "state.json").is_file()


def materialize(ckpt: Path, out: Path) -> Path:
    """Write checkpoint `ckpt` as a finished run's model directory `out` (verified first); returns `out`."""
    from sftlab.model.load import for_training, load_tokenizer
    from sftlab.model.methods import save_trained
    from sftlab.task import get_task

    ckpt, out = Path(ckpt), Path(out)
    why = checkpoint.problem(ckpt)
    if why is not None:
        raise CheckpointError(f"{ckpt}: {why}; export another checkpoint (or the finished run)")
    cfg = rundir.read_config(ckpt, [f"train.output_dir={out}", "train.sharding=none", "train.precision=fp32"])
    tokenizer, task = load_tokenizer(cfg.model), get_task(cfg)
    steps = json.loads((ckpt / "state.json").read_text()).get("step", 1)
    lm = for_training(task.load_model("fp32", tokenizer), cfg, "fp32", max(cfg.train.max_steps, steps, 1))
    if checkpoint.is_sharded(ckpt):
        _load_shards(ckpt, task.loss_module(lm))
    else:
        from safetensors.torch import load_file

        checkpoint.load_trainable(lm, load_file(ckpt / "trainable.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    save_trained(lm, out)
    template = task.chat_template(tokenizer)
    if template is not None:
        tokenizer.chat_template = template  # inference renders as training did
    tokenizer.save_pretrained(out)
    task.save_extras(out, tokenizer, lm)
    (out / rundir.CONFIG).write_text((ckpt / rundir.CONFIG).read_text(), encoding="utf-8")
    return out


def _load_shards(ckpt: Path, root) -> None:
    """The model's part of a Distributed Checkpoint, resharded into one unsharded process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    weights = get_model_state_dict(root, options=checkpoint.trainable_only())  # what save_sharded wrote
    try:
        dcp.load({"model": weights}, checkpoint_id=str(ckpt))
    except Exception as e:  # noqa: BLE001 -- DCP wraps every reader failure in its own exception types
        raise CheckpointError(f"{ckpt}: its shards do not fit this run's model ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None  # fmt: skip
    set_model_state_dict(root, weights, options=checkpoint.trainable_only(restoring=True))
