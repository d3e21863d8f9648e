"""Run records: metrics.jsonl (the contract), TensorBoard events, and the loss.png curve."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from sftlab import rundir
from sftlab.files import atomic_write_text
from sftlab.rundir import read_metrics


class MetricsLog:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard when asked. Only the main
    process owns the files: another rank truncating them on resume would race rank 0's appends."""

    def __init__(self, output_dir: Path, report_to: list[str], resume_step: int = 0, main: bool = True):
        self.path, self.main, self.tb = output_dir / rundir.METRICS, main, None
        if not main:
            return
        for path in (self.path, output_dir / rundir.GENERATIONS):
            if resume_step and path.is_file():
                truncate_after(path, resume_step)  # steps logged after the checkpoint will be logged again
            elif not resume_step:
                path.unlink(missing_ok=True)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}" if not key.startswith("eval") else key.replace("_", "/", 1),
                                       value, record["step"])  # fmt: skip

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class RunStatus:
    """status.json: how a dashboard tells running, finished and failed runs apart. A run killed
    outright cannot say so; its pid (on this host) no longer running tells that instead."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.path, self.enabled, self.fields = output_dir / rundir.STATUS, enabled, {}

    def set(self, status: str, **fields) -> None:
        if not self.enabled:
            return
        if not self.fields:
            self.fields = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.fields.update(fields, status=status, updated=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.fields))  # the dashboard polls it


def truncate_after(path: Path, step: int) -> None:
    """Keep the rows up to `step`. A last line cut off by a kill mid-write is dropped, not an error:
    that step comes after the checkpoint and is logged again."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Train and eval loss against step, with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    lrs = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per supervised token)")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), label="learning rate", color="tab:gray", linestyle="--", linewidth=1)
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
