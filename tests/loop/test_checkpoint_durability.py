"""Checkpoints that survive the machine (docs/correctness.md rule 6): a damaged or incomplete newest checkpoint
falls back to the older one, a full disk keeps the last good one, best/ is never lost between its renames,
nothing in a checkpoint is unpickled as code, and a launch the run does not see is never silent."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from helpers import losses
from safetensors.torch import load_file

import sftlab.loop.train as train_mod
from sftlab.errors import CheckpointError, SftlabError
from sftlab.files import atomic_dir, remove_stale
from sftlab.loop import checkpoint
from sftlab.loop.train import TrainError, check_launch, check_same_config, train

QUIET = {"say": lambda *a, **k: None}
RUN = ("train.save_steps=2", "train.save_total_limit=0")  # checkpoints at steps 2, 4 and 6 of 6


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished LoRA run with checkpoints at steps 2, 4 and 6 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("durable") / "run"
    train(tiny_config(tiny_model_dir, out, *RUN), **QUIET)
    return out


def copy_of(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def resume(tiny_model_dir, out, *extra):
    said = []
    summary = train(tiny_config(tiny_model_dir, out, *RUN, *extra), resume=True, say=said.append)
    return summary, "\n".join(map(str, said))


def step_dir(out, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:07d}"


def test_a_corrupted_newest_checkpoint_falls_back_to_the_older_one(tiny_model_dir, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    optimizer = step_dir(out, 6) / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the size unchanged: only the hash tells
    optimizer.write_bytes(bytes(data))
    summary, said = resume(tiny_model_dir, out)
    assert "skipping checkpoint" in said and "step-0000006: optimizer.pt does not match its sha256" in said
    assert "resumed from" in said and "step-0000004 at step 4" in said
    assert summary["outcome"] == "completed" and summary["steps"] == 6
    assert losses(out) == losses(finished)  # steps 5 and 6 again, exactly
    assert checkpoint.problem(step_dir(out, 6)) is None  # rewritten when the run reached it


def test_a_missing_file_or_manifest_names_the_problem_and_none_verifying_is_a_clear_error(
    tiny_model_dir, finished, tmp_path
):
    out = copy_of(finished, tmp_path)
    (step_dir(out, 6) / "rng.pt").unlink()
    (step_dir(out, 4) / checkpoint.MANIFEST).unlink()
    with open(step_dir(out, 2) / "trainable.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="no complete checkpoint .* verifies") as e:
        resume(tiny_model_dir, out)
    text = str(e.value)
    assert "step-0000006: rng.pt is missing" in text and "step-0000004: no manifest.json" in text
    assert "step-0000002: trainable.safetensors is " in text and "its manifest says" in text

    (step_dir(out, 2) / checkpoint.MANIFEST).write_text("{not json")
    assert checkpoint.problem(step_dir(out, 2)).startswith("manifest.json is unreadable")
    shutil.copytree(finished / "checkpoints" / "step-0000004", step_dir(out, 4), dirs_exist_ok=True)
    summary, said = resume(tiny_model_dir, out)
    assert "step-0000006: rng.pt is missing" in said and summary["steps"] == 6
    assert losses(out) == losses(finished)


def test_a_half_written_metrics_line_does_not_stop_a_resume(tiny_model_dir, finished, tmp_path):
    out = copy_of(finished, tmp_path)
    for step in (4, 6):
        shutil.rmtree(step_dir(out, step))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a kill mid-write
    summary, _ = resume(tiny_model_dir, out)
    assert summary["outcome"] == "completed" and losses(out) == losses(finished)


def test_a_full_disk_during_a_save_stops_clearly_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def fills_the_disk(obj, f, *a, **k):
        if ".tmp-step-0000004." in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:  # keep 1: the older checkpoint goes only after a complete new one
        train(tiny_config(tiny_model_dir, out, "train.save_steps=2", "train.save_total_limit=1"), **QUIET)
    text = str(e.value)
    assert "disk is full" in text and str(out / "checkpoints") in text and " free there" in text
    assert "step-0000002, is kept" in text and "--resume" in text
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # no partial step-4
    assert checkpoint.problem(step_dir(out, 2)) is None
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    summary, said = resume(tiny_model_dir, out, "train.save_total_limit=1")
    assert "step-0000002 at step 2" in said and summary["steps"] == 6


def saving(directory, needed, failure=None):
    with checkpoint.full_disk_stops(directory, "best/", "kept", needed):
        if failure is not None:
            raise failure


def test_a_disk_too_full_for_a_save_or_a_write_failing_on_it_is_named(tmp_path, monkeypatch):
    from types import SimpleNamespace

    free = iter([10**9, 10])  # enough before the write, then not (torch.save's writer gives no errno)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=next(free, 10)))
    written = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    with pytest.raises(CheckpointError, match=r"writing best/ in .* failed \(10 B free there\). The partial"):
        saving(tmp_path, 1000, written)
    with pytest.raises(CheckpointError, match=r"best/ needs 1000 B in .* \(10 B free there\). Nothing was written"):
        saving(tmp_path / "not-yet", 1000)
    with pytest.raises(RuntimeError, match="another failure"):  # not the disk: raised as it is
        saving(tmp_path, 0, RuntimeError("another failure"))


class RunsCode:
    """What an attacker's rng.pt could hold: unpickling it would call open(marker, 'w')."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_holding_a_pickled_object_is_refused_not_executed(tiny_model_dir, finished, tmp_path):
    import torch

    out = copy_of(finished, tmp_path)
    marker = tmp_path / "executed"
    torch.save({"python": RunsCode(marker)}, step_dir(out, 6) / "rng.pt")
    (step_dir(out, 6) / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(step_dir(out, 6))  # it verifies: the manifest is no defence against its writer
    with pytest.raises(CheckpointError, match=r"rng\.pt: refused to load.*other than tensors"):
        resume(tiny_model_dir, out)
    assert not marker.exists()


def test_rng_states_round_trip_through_weights_only(tmp_path):
    import random

    import numpy as np
    import torch

    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def scripted_evals(monkeypatch, *values):
    values = iter(values)
    monkeypatch.setattr(train_mod, "eval_now", lambda run: {"eval_loss": next(values, 9.9)})


def test_a_kill_between_the_renames_of_best_leaves_it_recoverable(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = ("train.method=full", "data.eval_split=0.2", "train.eval_steps=2", "train.save_best=true")
    scripted_evals(monkeypatch, 5.0, 3.0, 2.0)  # step 0, then best at step 2, a better one at step 4
    real_rename = Path.rename

    def killed_before_the_new_best_is_in(self, target):
        if self.name.startswith(".tmp-best.") and (self.parent / ".old-best").exists():
            raise KeyboardInterrupt  # the old best/ is aside, the new one not yet in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_best_is_in)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model_dir, out, *RUN, *cfg), **QUIET)
    monkeypatch.undo()
    assert not (out / "best").exists() and json.loads((out / ".old-best" / "state.json").read_text())["step"] == 2
    (out / "checkpoints" / ".tmp-step-0000006.x1").mkdir()  # what a hard kill mid-save leaves
    (out / ".tmp-best.x2").mkdir()

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert sorted(remove_stale(copy, "best")) == [".old-best", ".tmp-best.x2"]
    assert json.loads((copy / "best" / "state.json").read_text())["step"] == 2  # the old best, back in place

    scripted_evals(monkeypatch, 2.0, 2.5)  # steps 4 and 6 again
    summary, said = resume(tiny_model_dir, out, *cfg)
    assert "cleaned up after an interrupted save" in said and ".tmp-step-0000006.x1" in said
    assert summary["best_step"] == 4 and json.loads((out / "best" / "state.json").read_text())["step"] == 4
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert leftovers == []
    best, final = load_file(out / "best" / "trainable.safetensors"), load_file(out / "model.safetensors")
    assert all((final[k] == best[k]).all() for k in best if k in final)


def test_a_durable_directory_is_synced_before_its_rename_and_its_parent_after(tmp_path, monkeypatch):
    from sftlab import files

    events = []
    monkeypatch.setattr(files, "fsync_path", lambda p: events.append(("sync", Path(p).name)))
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, t: (events.append(("rename", Path(t).name)), real_rename(self, t)))
    target = tmp_path / "ckpt"
    for content in ("old", "new"):
        with atomic_dir(target, replace=True, durable=True) as tmp:
            (tmp / "a.bin").write_text(content)
    last = events[events.index(("rename", ".old-ckpt")) - 2 :]
    assert last[0] == ("sync", "a.bin") and last[1][0] == "sync" and last[1][1].startswith(".tmp-ckpt.")
    assert last[2:] == [("rename", ".old-ckpt"), ("rename", "ckpt"), ("sync", tmp_path.name)]
    assert (target / "a.bin").read_text() == "new" and not (tmp_path / ".old-ckpt").exists()


def test_trust_remote_code_in_a_saved_config_is_ignored(finished, tmp_path, monkeypatch):
    import sftlab.model.load as load_mod
    from sftlab.rundir import load_run, read_config

    out = copy_of(finished, tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True  # someone with write access to a shared run directory
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert read_config(out).model.trust_remote_code is False
    assert read_config(out, ["model.trust_remote_code=true"]).model.trust_remote_code is True  # the user's own

    asked, real = [], load_mod.from_pretrained

    def recorded(auto_cls, cfg, **kwargs):
        asked.append(cfg.trust_remote_code)
        return real(auto_cls, cfg, **kwargs)

    monkeypatch.setattr(load_mod, "from_pretrained", recorded)
    loaded = load_run(str(out))
    assert asked and not any(asked) and loaded.cfg.model.trust_remote_code is False


# --------------------------------------------------------------------------- a wrong launch is never silent

ACCELERATE_CPU = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "29500"}  # fmt: skip  # what `accelerate launch --cpu --num_processes 2` sets
LAUNCHER = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "sftlab"]


def test_a_launch_asking_for_more_processes_than_the_run_sees_stops_with_how_to_launch():
    with pytest.raises(TrainError, match=r"accelerate launch asked for 2 processes.*world of 1 process\b.*"
                                         r"torchrun --nproc_per_node 2 -m sftlab train CONFIG.*--cpu"):  # fmt: skip
        check_launch(1, ACCELERATE_CPU, LAUNCHER, cuda=False)
    with pytest.raises(TrainError, match="more than one process.*accelerate launch --multi_gpu"):
        check_launch(1, ACCELERATE_CPU, None, cuda=True)  # the launcher's command line unreadable
    with pytest.raises(TrainError, match=r"started 4 processes \(WORLD_SIZE=4\).*world of 1.*nproc_per_node 4"):
        check_launch(1, {"WORLD_SIZE": "4"}, None, cuda=False)
    check_launch(1, {**ACCELERATE_CPU, "MASTER_PORT": ""}, None, cuda=False)  # accelerate launch, one process
    check_launch(1, ACCELERATE_CPU, [*LAUNCHER[:4], "--num_processes=1"], cuda=False)
    check_launch(2, {"WORLD_SIZE": "2"}, None, cuda=False)
    check_launch(1, {}, None, cuda=False)


def test_a_wrong_launch_stops_the_run_before_it_trains(tiny_model_dir, tmp_path, monkeypatch):
    for key in ("ACCELERATE_MIXED_PRECISION", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, ACCELERATE_CPU[key])
    monkeypatch.setattr(train_mod, "_launcher_args", lambda: LAUNCHER)
    with pytest.raises(SftlabError, match="torchrun --nproc_per_node 2"):
        train(tiny_config(tiny_model_dir, tmp_path / "r"), **QUIET)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_ranks_that_disagree_on_the_config_stop():
    check_same_config([7, 7])
    with pytest.raises(TrainError, match="different configs: rank 2 differs.*same config file"):
        check_same_config([7, 7, 8])
