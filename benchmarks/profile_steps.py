"""Where a training step's time goes: torch.profiler over optimizer steps 5-7 of sftlab's own run.

    python benchmarks/profile_steps.py --model-config benchmarks/llama-1b.json train.compile=true   # GPU

Same model, data and settings as compare_trl.py's full-long (or lora-long) case at batch 32 (a fresh-weights model
from --model-config, the embedded model's tokenizer); prints the step times and the ops sorted by
their own device time (CPU time without a GPU). Extra arguments are sftlab overrides.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import compare_trl as ct
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="a config.json: train this architecture from fresh weights")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the embedded model's)")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("overrides", nargs="*", help="sftlab overrides, e.g. train.compile=true")
    args = parser.parse_args()
    opts = dict(o.split("=", 1) for o in args.overrides)
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        files = ct.build_data(workdir)
        if args.tokenizer is None:
            from sftlab.model.load import resolve_model_dir

            args.tokenizer = resolve_model_dir("smollm2-135m-instruct")
        model = ct.random_model(args.model_config, args.tokenizer, workdir / "model")
        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        prof = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(wait=4, warmup=1, active=3))
        prof.start()
        register_optimizer_step_post_hook(lambda *a: prof.step())  # one profiler step per optimizer step
        lr = 3e-5 if args.method == "full" else 2e-4
        run = ct.run_sftlab(model, args.method, files["long-train"], 1024, 32, 9, lr, workdir / "out", opts)
        prof.stop()
    print("step times", [round(t, 4) for t in run["step_times"]], "tokens", run["tokens"], "peak MB", ct.peak_memory_mb())
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


if __name__ == "__main__":
    main()
