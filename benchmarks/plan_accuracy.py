"""How close `sftlab plan` comes to the measured peak memory of real runs (CPU: peak RSS).

    python benchmarks/plan_accuracy.py            # three configurations on the embedded SmolLM2-135M

Each configuration trains 3 steps in a fresh subprocess; its peak RSS (ru_maxrss of the child)
is compared with the planner's estimate for the same config.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "lora bf16, batch 8": ["train.method=lora", "train.batch_size=8"],
    "full bf16, batch 4": ["train.method=full", "train.batch_size=4"],
    "lora fp32, batch 16, checkpointing": ["train.method=lora", "train.precision=fp32", "train.batch_size=16",
                                           "train.gradient_checkpointing=true"],
}  # fmt: skip


WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # a fresh parent per run: its only child


def measure(config: str, overrides: list[str], out: str) -> int:
    """Peak RSS in bytes of `sftlab train` for 3 steps."""
    sftlab = Path(sys.executable).parent / "sftlab"
    cmd = [str(sftlab), "train", config, "--overwrite", f"train.output_dir={out}", "train.max_steps=3",
           "train.report_to=[]", "data.eval=[]", *overrides]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) * 1024


def compare(config: str, cases: dict[str, list[str]], out: str) -> list[tuple[str, int, int]]:
    from sftlab.config import load_config
    from sftlab.plan import estimate

    rows = []
    for name, overrides in cases.items():
        measured = measure(config, overrides, out)
        rows.append((name, estimate(load_config(config, overrides)).total, measured))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--out", default="/tmp/sftlab-plan-accuracy")
    args = ap.parse_args()
    print(f"{'case':40}{'estimate MiB':>14}{'measured MiB':>14}{'error':>8}")
    for name, est, got in compare(args.config, CASES, args.out):
        print(f"{name:40}{est / 2**20:14.0f}{got / 2**20:14.0f}{(est - got) / got:+8.1%}")


if __name__ == "__main__":
    main()
