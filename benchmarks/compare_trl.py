"""sftlab against TRL's SFTTrainer, side by side, on this machine, in one run.

    pip install -e '.[bench]'          # adds trl
    python benchmarks/compare_trl.py   # all cases, ~40 min on 2 CPU cores
    python benchmarks/compare_trl.py --cases lora-short --steps 4   # one case, quick
    python benchmarks/compare_trl.py --model-config benchmarks/llama-1b.json --cases full-long \
        --batch 32 --steps 12 --runners sftlab,sftlab-ckpt,trl-bf16-packing,trl-bf16-packing-nockpt  # GPU

Every run is a fresh subprocess (so its peak memory is its own) on the same model (the embedded
SmolLM2-135M-Instruct, or with --model-config an architecture given as a config.json with fresh
weights, saved once so that every runner starts from the same ones), data, max length, effective
batch, learning rate, LoRA settings and number of optimizer steps; runners alternate order from
case to case. Both sides train on the last
assistant turn (TRL's prompt-completion loss; sftlab `train_on: last`), and both final models are
scored by the same evaluator (fp32, one example at a time, loss per supervised token).

Throughput counts prompt and response tokens (not padding) per second of optimizer steps (model
loading and data preparation excluded on both sides). MFU = achieved model FLOP/s over the matmul
peak of the precision the run trained in (fp32, bf16 or fp16), measured beside each run (the higher
of just before and just after it): per token 6N (full) or 4N (LoRA: no weight grads) for the
transformer blocks, the same factor times the LM head for supervised tokens only (that is all sftlab
computes; TRL computes more), plus causal attention 6*L*d*T (full) or 4*L*d*T (LoRA), T the
token-weighted mean example length of the training data (sum T^2 / sum T, with the model's chat
template).
On CUDA memory is `torch.cuda.max_memory_allocated` and the MFU of a bf16 or fp16 run is also given
against the H100's nominal dense bf16/fp16 peak (989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
CASES = {  # name: (method, long examples?, batch size, steps, lr)
    "lora-short": ("lora", False, 8, 8, 2e-4),
    "full-short": ("full", False, 8, 5, 3e-5),
    "lora-long": ("lora", True, 4, 3, 2e-4),
    "full-long": ("full", True, 4, 2, 3e-5),
}
RUNNERS = {  # name: (engine, options)
    "sftlab": ("sftlab", {}),
    "sftlab-fp32": ("sftlab", {"precision": "fp32"}),
    "sftlab-shuffled": ("sftlab", {"group_by_length": "false"}),  # TRL's data order: plain shuffling
    "trl-default": ("trl", {"bf16": False, "packing": False}),
    "trl-bf16": ("trl", {"bf16": True, "packing": False}),
    "trl-bf16-packing": ("trl", {"bf16": True, "packing": True}),
    "sftlab-packing": ("sftlab", {"data.packing": "true"}),
    "sftlab-padded": ("sftlab", {"data.padding_free": "false"}),  # the default elsewhere than CUDA
    "sftlab-ckpt": ("sftlab", {"gradient_checkpointing": "true"}),
    "sftlab-compile": ("sftlab", {"compile": "true"}),
    "sftlab-compile-ckpt": ("sftlab", {"compile": "true", "gradient_checkpointing": "true"}),
    "trl-bf16-packing-nockpt": ("trl", {"bf16": True, "packing": True, "gradient_checkpointing": False}),
}
H100_BF16_TFLOPS = 989.0


# --------------------------------------------------------------------------- data


def build_data(workdir: Path) -> dict[str, Path]:
    """Messages JSONL files: short (the bundled data) and long (~1,000-token multi-turn chats)."""
    from sftlab.data.formats import load_conversations

    def convs(path):
        return [[{"role": m.role, "content": m.content} for m in c.messages if m.role != "system"]
                for c in load_conversations(str(path)).conversations]  # fmt: skip

    train = convs(DATA / "alpaca_tasks.jsonl") + convs(DATA / "sharegpt_chats.json") + convs(DATA / "messages_zh_identity.jsonl")
    evals = convs(DATA / "eval.jsonl")
    long_train = [sum(train[i : i + 14], []) for i in range(0, len(train) - 14, 14)]
    long_eval = [sum(evals[i : i + 14], []) for i in range(0, len(evals) - 14, 14)]
    files = {}
    for name, rows in {"short-train": train, "short-eval": evals, "long-train": long_train, "long-eval": long_eval}.items():
        files[name] = workdir / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"messages": r}, ensure_ascii=False) + "\n" for r in rows))
    return files


# --------------------------------------------------------------------------- workers (run in subprocesses)


def worker(args) -> dict:
    method, long, batch, steps, lr = CASES[args.case]
    batch, steps = args.batch or batch, args.steps or steps
    engine, opts = RUNNERS[args.runner]
    train_file, eval_file, max_length = case_data(args.workdir, long)
    out = Path(args.workdir) / f"{args.case}-{args.runner}"
    model = args.model_dir
    run = (run_sftlab if engine == "sftlab" else run_trl)(model, method, train_file, max_length, batch, steps, lr, out, opts)
    run["peak_mb"] = peak_memory_mb()  # training's peak, before eval
    run["eval_loss"] = common_eval_loss(run.pop("model"), model, eval_file, max_length)
    return run


def case_data(workdir: str, long: bool) -> tuple[Path, Path, int]:
    """A case's training file, eval file (written by build_data) and max length."""
    prefix, max_length = ("long", 1024) if long else ("short", 512)
    return Path(workdir) / f"{prefix}-train.jsonl", Path(workdir) / f"{prefix}-eval.jsonl", max_length


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for the GPU's queued work, so that a wall clock times it (nothing to wait for on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sftlab(model_dir, method, train_file, max_length, batch, steps, lr, out, opts) -> dict:
    from sftlab.config import load_config
    from sftlab.loop.train import train
    from sftlab.rundir import load_run, read_metrics

    cfg = load_config(None, [
        f"model.name={model_dir}", f"data.train=[{train_file}]", f"data.max_length={max_length}", "data.train_on=last", "data.cache=false",
        f"train.method={method}", f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.lr={lr}",
        f"train.output_dir={out}", "train.report_to=[]", "lora.dropout=0.0",
    ] + [f"{k if '.' in k else 'train.' + k}={v}" for k, v in opts.items()])  # fmt: skip
    summary = train(cfg, overwrite=True, say=lambda *a: None)
    steps = [m for m in read_metrics(out / "metrics.jsonl") if "step_time_s" in m]
    step_times, first_step_tokens = [m["step_time_s"] for m in steps], steps[0]["tokens"]
    return {
        "tokens": summary["tokens"], "supervised_tokens": summary["supervised_tokens"], "steps": summary["steps"],
        "train_time_s": sum(step_times), "train_loss": summary["final_train_loss"],
        "model": _Lazy(lambda: load_run(str(out)).model), "precision": summary["precision"],
        "step_times": step_times, "first_step_tokens": first_step_tokens,
    }  # fmt: skip


class _Lazy:
    """Loads the trained model only when the evaluator asks, after the peak RSS was read."""

    def __init__(self, load):
        self.load = load


def run_trl(model_dir, method, train_file, max_length, batch, steps, lr, out, opts) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line)["messages"] for line in train_file.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])

    class StepClock(TrainerCallback):
        def __init__(self):
            self.steps, self.started = [], None

        def on_step_begin(self, *a, **k):
            sync()
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()  # the GPU's queued work belongs to this step (the Trainer syncs only when it logs, later)
            self.steps.append(time.perf_counter() - self.started)

    clock = StepClock()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if opts["packing"]:  # TRL's batch counts packed rows: keep the tokens per step equal to the padded runs'
        from trl.data_utils import pack_dataset

        ids = [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"][:max_length] for m in rows]
        packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), max_length, strategy="bfd")
        batch = max(1, round(batch * len(packed) / len(ids)))  # examples per step -> packed rows per step
    config = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", max_length=max_length, bf16=opts["bf16"],
        packing=opts["packing"], use_cpu=not torch.cuda.is_available(), seed=42, dataloader_num_workers=0,
        disable_tqdm=True, gradient_checkpointing=opts.get("gradient_checkpointing", True),  # TRL's default: on
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM") if method == "lora" else None  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens": int(logs[-1].get("num_tokens", 0)), "supervised_tokens": None, "steps": trainer.state.global_step,
        "train_time_s": round(sum(clock.steps), 3), "train_loss": logs[-1]["loss"], "model": trainer.model,
        "precision": "bf16" if opts["bf16"] else "fp32", "step_times": clock.steps, "rows_per_step": batch,
        "first_step_tokens": int(logs[0].get("num_tokens", 0)),
    }  # fmt: skip


def common_eval_loss(model, model_dir: str, eval_file: Path, max_length: int) -> float:
    """The same evaluator for every runner: fp32, one example at a time, loss per supervised token."""
    import torch

    from sftlab.config import DataConfig, DatasetSpec
    from sftlab.data.dataset import load_split
    from sftlab.model.load import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=model_dir))
    data = load_split(DataConfig(eval=[DatasetSpec(path=str(eval_file))], max_length=max_length, train_on="last",
                                 cache=False), tok, "eval").dataset  # fmt: skip
    dev = device()
    model = (model.load() if isinstance(model, _Lazy) else model).float().eval().to(dev)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in data:
            ids, labels = torch.tensor([row["input_ids"]], device=dev), torch.tensor([row["labels"]], device=dev)
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    return total / count


# --------------------------------------------------------------------------- driver


def matmul_peak() -> dict:
    """Measured GEMM throughput (GFLOP/s) on this machine (its GPU if it has one), now, for each precision
    a run can train in (fp16 only on CUDA: sftlab refuses it elsewhere)."""
    import torch

    dev = device()
    n = 8192 if dev == "cuda" else 2048
    peaks = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} | ({"fp16": torch.float16} if dev == "cuda" else {})
    for name, dtype in dtypes.items():
        a, b = (torch.randn(n, n, dtype=dtype, device=dev) for _ in range(2))
        for _ in range(3):
            a @ b
        sync()
        t, reps = time.perf_counter(), 10
        for _ in range(reps):
            a @ b
        sync()
        peaks[name] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    return peaks


def mfu(r: dict, per_token: float, peaks: dict) -> dict:
    """MFU of run `r` against the matmul peak of the precision it trained in. A CPU without native bf16
    emulates it at a fraction of its fp32 speed, so an fp32 run over the bf16 peak would read above 100%."""
    peak = peaks[r["precision"]]
    return {"peak_precision": r["precision"], "peak_gflops": round(peak, 1),
            "mfu": r["tokens_per_s"] * per_token / (peak * 1e9),
            "steady_mfu": r["steady_tokens_per_s"] * per_token / (peak * 1e9)}  # fmt: skip


def flops_per_token(model_dir: str, method: str, avg_len: float, supervised_fraction: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    d, layers, heads, kv = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    block = layers * (d * heads * head_dim * 2 + 2 * d * kv * head_dim + 3 * d * c.intermediate_size)
    factor = 6 if method == "full" else 4
    return factor * block + factor * d * c.vocab_size * supervised_fraction + factor * layers * d * avg_len


@functools.lru_cache
def attention_length(model_dir: str, train_file: str, max_length: int) -> float:
    """The per-token average of the causal attention span: sum(T^2) / sum(T) over the examples, each
    T tokens after the chat template and truncation (a token attends to T/2 positions on average)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(max_length, len(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True,
                                                                 return_dict=True)["input_ids"]))
               for line in Path(train_file).read_text().splitlines()]  # fmt: skip
    return sum(t * t for t in lengths) / sum(lengths)


def random_model(config_file: str, tokenizer_dir: str, out: Path) -> str:
    """The architecture of `config_file` with fresh weights (seed 0) and the tokenizer of `tokenizer_dir`,
    saved once so that every runner loads the same starting point."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    spec = json.loads(Path(config_file).read_text())
    config = AutoConfig.for_model(**spec)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if config.vocab_size < len(tokenizer):
        raise SystemExit(f"{config_file}: vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {config_file} ({config.model_type}, {params / 1e9:.2f}B parameters, random init), "
          f"tokenizer from {tokenizer_dir}")  # fmt: skip
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--runners", default="sftlab,trl-default,trl-bf16,trl-bf16-packing")
    parser.add_argument("--steps", type=int, help="override every case's step count")
    parser.add_argument("--batch", type=int, help="override every case's examples per step")
    parser.add_argument("--model-config", help="a config.json: train this architecture from fresh weights")
    parser.add_argument("--tokenizer", help="tokenizer directory for --model-config (default: the embedded model's)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    peaks = matmul_peak()
    measured = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items() if k != "device")
    print(f"matmul peak on {peaks['device']} now: {measured}")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        build_data(Path(workdir))
        from sftlab.model.load import resolve_model_dir

        embedded = resolve_model_dir("smollm2-135m-instruct") if not (args.model_config and args.tokenizer) else None
        model_dir = (random_model(args.model_config, args.tokenizer or embedded, Path(workdir) / "model")
                     if args.model_config else embedded)  # fmt: skip
        for i, case in enumerate(args.cases.split(",")):
            runners = args.runners.split(",")
            for runner in runners if i % 2 == 0 else runners[::-1]:  # alternate who runs first
                results.append(run_one(case, runner, workdir, model_dir, args, peaks))
                print(row_text(results[-1]), flush=True)
    print()
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "results": results}, indent=1))


def run_one(case: str, runner: str, workdir: str, model_dir: str, args, peaks: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--runner", runner, "--workdir", workdir,
           "--model-dir", model_dir]  # fmt: skip
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--batch", str(args.batch)] if args.batch else []
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    before = matmul_peak()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    # A shared machine's speed drifts (its bf16 peak read 314-412 GFLOP/s within an hour here): take
    # the peaks beside each run, the higher of before and after, so a slow spell cannot inflate MFU.
    after = matmul_peak()
    beside = {k: max(v, after[k]) for k, v in before.items() if k != "device"}
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"case": case, "runner": runner, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    r = json.loads(line[-1][7:]) | {"case": case, "runner": runner}
    r["tokens_per_s"] = r["tokens"] / r["train_time_s"]
    r["step_s"] = r["train_time_s"] / r["steps"]
    r["tokens_per_step"] = r["tokens"] / r["steps"]
    # After the first step, which also pays one-time costs (kernel selection, optimizer state, lazy imports).
    r["steady_tokens_per_s"] = (r["tokens"] - r["first_step_tokens"]) / sum(r["step_times"][1:])
    method, long = CASES[case][0], CASES[case][1]
    train_file, _, max_length = case_data(workdir, long)
    avg_len = attention_length(model_dir, str(train_file), max_length)
    r["attention_length"] = round(avg_len, 1)
    sup_frac = (r["supervised_tokens"] or 0) / r["tokens"] if r["supervised_tokens"] else 0.15
    per_token = flops_per_token(model_dir, method, avg_len, sup_frac)
    r |= mfu(r, per_token, beside)
    if peaks["device"] != "cpu" and r["precision"] != "fp32":  # 989 is the H100's bf16/fp16 figure
        r["steady_mfu_989"] = r["steady_tokens_per_s"] * per_token / (H100_BF16_TFLOPS * 1e12)
    return r


def row_text(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:11s} {r['runner']:17s} FAILED: {r['error']}"
    nominal = f", {100 * r['steady_mfu_989']:.1f}% of 989 TFLOP/s" if "steady_mfu_989" in r else ""
    return (f"{r['case']:11s} {r['runner']:17s} {r['tokens_per_s']:7.1f} tok/s  {r['step_s']:6.2f} s/step  "
            f"{r['tokens_per_step']:5.0f} tok/step  peak {r['peak_mb']:6.0f} MB  train loss {r['train_loss']:.4f}  "
            f"eval loss {r['eval_loss']:.4f}  MFU {100 * r['mfu']:.1f}% (after step 1: {100 * r['steady_mfu']:.1f}%"
            f"{nominal}; {r['peak_precision']} peak beside it {r['peak_gflops']:.0f} GFLOP/s)")  # fmt: skip


def markdown(results: list[dict]) -> str:
    lines = ["| case | runner | tokens/s | s/step | tokens/step | peak MB | train loss | eval loss | MFU | MFU after step 1 "
             "| MFU against | sftlab ÷ this |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ours = {r["case"]: r for r in results if r["runner"] == "sftlab" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['runner']} | failed: {r['error']} | | | | | | | | | |")
            continue
        ratio = ours[r["case"]]["tokens_per_s"] / r["tokens_per_s"] if r["case"] in ours else float("nan")
        lines.append(f"| {r['case']} | {r['runner']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | {r['tokens_per_step']:.0f} "
                     f"| {r['peak_mb']:.0f} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | {100 * r['mfu']:.1f}% "
                     f"| {100 * r['steady_mfu']:.1f}% | {r['peak_precision']} {r['peak_gflops']:.0f} GFLOP/s | {ratio:.2f}x |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
