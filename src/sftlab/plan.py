"""`sftlab plan`: peak training memory, estimated before loading any weights, and a setting that fits.

The model is built on the meta device (shapes only), wrapped by the chosen method to count what
trains, then peak memory is the sum of:

    runtime       Python, torch, transformers, tokenizer and data (measured once per device kind)
    weights       frozen parameters in their stored dtype (NF4: half a byte), trainable ones in fp32
                  (full bf16: a bf16 model beside fp32 masters); on CPU at least the safetensors
                  file's size (its pages are mapped and counted in RSS)
    gradients     fp32, trainable parameters only (full bf16: bf16, plus one fp32 piece at the step)
    optimizer     AdamW: two fp32 moments per trainable parameter
    activations   saved per token per layer: (16 h + 5 i) values for a Llama-style block, in the
                  compute dtype; with gradient checkpointing one h per layer plus one block's worth
    loss          (supervised tokens or one chunk) x vocab logits in fp32, with softmax and gradient

The activation constants were fitted to peak RSS measured on CPU with SmolLM2-135M
(benchmarks/plan_accuracy.py; RSS keeps the allocator's high-water mark, so checkpointing saves
less than the saved-tensor count suggests); on a GPU the structural counts are used unscaled. a micro-batch is assumed to be batch_size rows as long as the longest training example
(data.max_length without data), which is the peak a length-grouped run reaches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

RUNTIME_BYTES = {"cpu": 600 * 2**20, "cuda": 600 * 2**20}  # CUDA: context and allocator reserve on the GPU
ACT_H, ACT_I = 16, 5  # saved values per token per layer, in units of hidden size and intermediate size
# Measured/structural ratios on CPU (fitted): activations per dtype, and what checkpointing keeps.
CPU_ACT_SCALE = {2: 0.30, 4: 0.69}
CPU_CKPT_SCALE = 0.55


@dataclass
class Estimate:
    runtime: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    trainable: int
    total_params: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.gradients + self.optimizer + self.activations + self.loss

    def rows(self) -> list[tuple[str, int]]:
        return [("runtime", self.runtime), ("weights", self.weights), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("activations", self.activations),
                ("logits and loss", self.loss), ("total (peak)", self.total)]  # fmt: skip


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 24GiB, 16GB or 8000MiB")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_"))


def shapes(cfg):
    """(model on the meta device wrapped by the method, its config); no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.model.load import resolve_model_dir
    from sftlab.model.methods import wrap

    config = AutoConfig.from_pretrained(resolve_model_dir(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model = wrap(model, cfg, total_steps=max(cfg.train.max_steps, 100))
    return model, config


def estimate(cfg, batch_size: int | None = None, checkpointing: bool | None = None, device: str | None = None,
             model_and_config=None) -> Estimate:  # fmt: skip
    import torch

    from sftlab.config import FROZEN_BASE
    from sftlab.model.load import count_parameters
    from sftlab.model.precision import half_dtype, resolve_precision
    from sftlab.speed.masters import applies, step_elements

    model, config = model_and_config or shapes(cfg)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch_size or cfg.train.batch_size
    ckpt = cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    precision = resolve_precision(cfg.train.precision) if device == "cpu" or torch.cuda.is_available() else "bf16"
    half = half_dtype(precision) is not None
    trainable, total = count_parameters(model)
    frozen = total - trainable
    method = cfg.train.method
    if method == "qlora":
        embed = config.vocab_size * config.hidden_size * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        weight_bytes = (frozen - embed) // 2 + embed * 2  # NF4 linear weights, bf16 embeddings
    else:
        weight_bytes = frozen * (2 if method in FROZEN_BASE and half else 4)
        if device == "cpu":
            weight_bytes = max(weight_bytes, _file_bytes(cfg) * frozen // max(total, 1))
    masters = applies(cfg, precision, single_process=True)  # a bf16 model over fp32 masters, as training decides
    if masters:
        weight_bytes += total * 2
    weight_bytes += trainable * 4
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    tokens = batch * longest_example(cfg)
    act_value = 2 if half else 4
    per_layer_token = (ACT_H * h + ACT_I * inter) * act_value
    if device == "cpu":
        acts = tokens * layers * per_layer_token * CPU_ACT_SCALE[act_value] * (CPU_CKPT_SCALE if ckpt else 1.0)
    else:
        acts = tokens * (layers * h * act_value + per_layer_token) if ckpt else tokens * layers * per_layer_token
    logit_rows = min(tokens, cfg.train.loss_chunk_tokens)
    loss = logit_rows * config.vocab_size * (6 if device == "cpu" else 12)  # fp32 logits, softmax, gradient
    # Masters: bf16 gradients until the step, which converts one piece (CPU) or chunk (GPU) at a time to fp32.
    grads = trainable * 2 + min(trainable, step_elements(device)) * 4 if masters else trainable * 4
    return Estimate(RUNTIME_BYTES[device], int(weight_bytes), grads, trainable * 8, int(acts), loss,
                    trainable, total)  # fmt: skip


def _file_bytes(cfg) -> int:
    from pathlib import Path

    from sftlab.model.load import resolve_model_dir

    path = Path(resolve_model_dir(cfg.model.name))
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def longest_example(cfg) -> int:
    """The longest tokenized training example (a full micro-batch is that wide), else data.max_length."""
    if not cfg.data.train:
        return cfg.data.max_length
    from sftlab.data.batching import example_lengths
    from sftlab.data.dataset import load_split
    from sftlab.model.load import load_tokenizer

    split = load_split(cfg.data, load_tokenizer(cfg.model), "train")  # cached after the first time
    return max(example_lengths(split.dataset))


def propose(cfg, budget: int, model_and_config=None) -> list[tuple[int, int, bool, Estimate]]:
    """(batch_size, grad_accum, checkpointing, estimate) that keep the effective batch, largest micro-batch first."""
    model_and_config = model_and_config or shapes(cfg)
    effective = cfg.train.batch_size * cfg.train.grad_accum
    options = []
    for ckpt in (False, True):
        batch = effective
        while batch >= 1:
            if effective % batch == 0:
                est = estimate(cfg, batch, ckpt, model_and_config=model_and_config)
                options.append((batch, effective // batch, ckpt, est))
            batch //= 2
    fitting = [o for o in options if o[3].total <= budget]
    # Checkpointing costs about a third more compute; prefer no checkpointing at a smaller micro-batch
    # unless that would cut the micro-batch below a quarter of the checkpointed one.
    fitting.sort(key=lambda o: (-(o[0] * (0.75 if o[2] else 1.0)), o[2]))
    return fitting


def print_plan(cfg, budget: int, say: Callable[[str], None] = print) -> bool:
    """`sftlab plan`'s table: the estimate of the config as written against `budget`, then the best setting
    that fits. False when nothing fits (the command then exits 1)."""
    model_and_config = shapes(cfg)
    est = estimate(cfg, model_and_config=model_and_config)
    ckpt = "on" if cfg.train.gradient_checkpointing else "off"
    say(f"{cfg.model.name}, {cfg.train.method}: {est.trainable:,} trainable of {est.total_params:,} parameters; "
        f"batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum}, checkpointing {ckpt}")  # fmt: skip
    for name, value in est.rows():
        say(f"  {name:18} {gib(value):>12}")
    verdict = "fits" if est.total <= budget else "does NOT fit"
    say(f"budget {gib(budget)}: the config as written {verdict}")
    options = propose(cfg, budget, model_and_config)
    if not options:
        say("nothing fits, even batch 1 with checkpointing: try train.method=lora or qlora, a shorter "
            "data.max_length, or train.precision=bf16")  # fmt: skip
        return False
    batch, accum, ckpt_on, best = options[0]
    say(f"proposed: train.batch_size={batch} train.grad_accum={accum} "
        f"train.gradient_checkpointing={'true' if ckpt_on else 'false'}  (peak {gib(best.total)}, "
        f"effective batch {batch * accum} unchanged)")  # fmt: skip
    return True


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory() -> int:
    """GPU memory of device 0, else the memory this machine has available now (cgroup limit respected)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = open(limit).read().strip()
            if value.isdigit() and int(value) < 2**60:
                return int(value)
        except OSError:
            pass
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell this machine's memory; pass --memory")
