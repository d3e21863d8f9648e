"""Peak memory of the loss: plain (full logits) against sftlab's chunked supervised-only head.

    python benchmarks/loss_memory.py [--length 2048] [--batch 2]

Each variant runs forward + backward of the embedded SmolLM2-135M-Instruct (LoRA, bf16) on the same
batch in a fresh subprocess; the figure is the process's peak RSS during the step (the kernel's
high-water mark, reset after the model is loaded) minus its RSS just before the step, so it is
the memory the step itself needs. The batch is
fully supervised (`train_on: all`, the worst case for the logits: every position needs one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(variant: str, length: int, batch: int, chunk_tokens: int) -> dict:
    import torch

    import sftlab.model.loss as loss_mod
    from sftlab.config import ModelConfig, load_config
    from sftlab.model.load import for_training, load_model

    lm = for_training(load_model(ModelConfig()), load_config(None), "bf16", 1)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (batch, length))
    batch_in = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if variant == "plain":
        loss_mod._plain_head = lambda m: False  # the usual path: model(...).logits over every position
    chunk = chunk_tokens if variant == "chunked" else 10**9
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: model loading must not count
    rss_before = _status_mb("VmRSS")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_mod.loss_sum(lm, batch_in, chunk)
    loss.backward()
    step_peak = _status_mb("VmHWM") - rss_before
    return {"variant": variant, "loss": loss.item() / (batch * (length - 1)), "step_peak_mb": step_peak}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens for the chunked variant")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.length, args.batch, args.chunk)))
        return
    results = {}
    for variant in ("plain", "supervised-only", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--length", str(args.length),
                              "--batch", str(args.batch), "--chunk", str(args.chunk)],
                             capture_output=True, text=True)  # fmt: skip
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{variant} failed: {out.stderr.strip().splitlines()[-1:]}")
        results[variant] = json.loads(line[0][7:])
    base = results["plain"]["step_peak_mb"]
    print(f"loss memory, batch {args.batch} x {args.length} tokens, all supervised (SmolLM2-135M, vocab 49,152, "
          f"LoRA bf16), chunks of {args.chunk} tokens")
    print(f"{'variant':18s} {'step peak MB':>12s} {'vs plain':>9s} {'loss/token':>11s}")
    for r in results.values():
        print(f"{r['variant']:18s} {r['step_peak_mb']:12.0f} {r['step_peak_mb'] / base:8.2f}x {r['loss']:11.5f}")


if __name__ == "__main__":
    main()
