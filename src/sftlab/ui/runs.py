"""What the dashboard knows of the runs under one directory: their status, config, metrics and reports.

A run is named by its directory; requests name runs, never paths, and a name is looked up among
the runs found, so no request can reach a file outside the runs directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "status.json")
QUIET_S = 120  # a run without status.json whose files have not changed for this long is not running


def find_runs(root: Path) -> dict[str, Path]:
    """Run directories directly under `root` (or `root` itself when it is one), by name."""
    candidates = [root] if _is_run(root) else sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    return {p.resolve().name: p for p in candidates if _is_run(p)}


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_MARKERS)


def run_file(runs: dict[str, Path], name: str, *parts: str) -> Path | None:
    """A file of a known run, or None; refuses anything that resolves outside that run's directory."""
    if name not in runs:
        return None
    base = runs[name].resolve()
    path = base.joinpath(*parts).resolve()
    return path if path.is_relative_to(base) and path.is_file() else None


def status(run: Path) -> dict:
    """{"status": running|finished|interrupted|failed|stopped, "error"?, "total_steps"?, "updated"}."""
    saved = _json(run / "status.json")
    metrics = run / "metrics.jsonl"
    files = (run / "status.json", metrics, run / "config.yaml")  # config.yaml: written as setup starts
    updated = max((p.stat().st_mtime for p in files if p.is_file()), default=None)
    if saved is not None:
        out = {k: saved[k] for k in ("status", "error", "total_steps", "outcome") if k in saved}
        if saved.get("status") == "running" and saved.get("host") == socket.gethostname() and not _alive(saved.get("pid")):
            out.update(status="failed", error="the training process ended without finishing (killed?)")
        return {**out, "updated": updated}
    summary = _json(run / "summary.json")  # a run from before status.json existed
    if summary is not None:
        finished = summary.get("outcome") != "interrupted"
        return {"status": "finished" if finished else "interrupted", "outcome": summary.get("outcome"),
                "total_steps": summary.get("total_steps"), "updated": updated}  # fmt: skip
    recent = updated is not None and time.time() - updated < QUIET_S
    return {"status": "running" if recent else "stopped", "updated": updated}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def overview(name: str, run: Path) -> dict:
    """One row of the runs table."""
    config = _yaml(run / "config.yaml") or {}
    rows = read_metrics_from(run / "metrics.jsonl", 0)[0]
    last_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
    last_eval = next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None)
    model, train = config.get("model") or {}, config.get("train") or {}
    return {"name": name, **status(run), "task": config.get("task", "causal_lm"), "model": model.get("name"),
            "method": train.get("method"), "step": max((r.get("step", 0) for r in rows), default=0),
            "loss": last_loss, "eval_loss": last_eval, "has_report": (run / "report.html").is_file(),
            "has_eval": (run / "eval" / "metrics.json").is_file()}  # fmt: skip


def details(name: str, run: Path) -> dict:
    """Everything the run page shows except the metrics rows (fetched, and polled, separately)."""
    config_text = (run / "config.yaml").read_text(encoding="utf-8") if (run / "config.yaml").is_file() else ""
    return {**overview(name, run), "config": config_text, "data_report": _json(run / "data_report.json"),
            "eval": _json(run / "eval" / "metrics.json"), "summary": _json(run / "summary.json")}  # fmt: skip


def read_metrics_from(path: Path, offset: int) -> tuple[list[dict], int, bool]:
    """Rows of metrics.jsonl from line `offset` on, the next offset, and whether the file was
    rewritten (a resumed run truncates it) so the reader must start over."""
    if not path.is_file():
        return [], 0, offset > 0
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the last piece is empty or a line still being written
    reset = offset > len(complete)
    start = 0 if reset else offset
    rows = []
    for line in complete[start:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append({})  # keep line numbers aligned with offsets
    return [r for r in rows if r], len(complete), reset


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
