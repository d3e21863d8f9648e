"""What a run directory holds, and the one loader every consumer of a run uses.

    RUN_DIR/
      config.yaml         the resolved config (absolute paths)     data_report.json  the per-dataset report
      metrics.jsonl       one JSON object per logged step          status.json       running | finished | ...
      summary.json        the run's summary                        loss.png, tensorboard/
      generations.jsonl   answers during training (eval.generate_every)
      checkpoints/step-NNNNNNN/   what --resume needs              best/   weights of the best eval loss
      eval/               metrics.json and samples.jsonl (sftlab eval; confusion.* for classification)
      report.html         sftlab report
      the final model, one of:
        adapter_config.json + adapter_model.safetensors          a peft adapter (lora, qlora, ia3, prefix, ...)
        bottleneck_config.json + bottleneck_adapters.safetensors  train.method=adapter
        config.json + model.safetensors                           a full model (full, freeze)
      tokenizer files with chat_template.jinja (the template trained with); labels.json (classification)

`load_run` is how generate, chat, serve, eval, predict, translate and merge read a run (or any model).
A qlora run is loaded on the 4-bit NF4 base it trained on, so every reader sees the model training computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sftlab.config import Config, ModelConfig, load_config
from sftlab.errors import ModelError
from sftlab.model.methods import ADAPTER_CONFIG as BOTTLENECK_CONFIG

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
DATA_REPORT = "data_report.json"
STATUS = "status.json"
GENERATIONS = "generations.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"
EVAL = "eval"
REPORT = "report.html"
LABELS_FILE = "labels.json"
PEFT_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
# What a training run writes; a new run refuses a directory holding any of them (unless --overwrite).
RUN_FILES = (CHECKPOINTS, TENSORBOARD, BEST, METRICS, GENERATIONS, SUMMARY, LOSS_PLOT, EVAL, REPORT, STATUS)


def model_kind(path: Path) -> str | None:
    """'bottleneck', 'peft' or 'full': the final model a directory holds; None when it holds none."""
    for kind, marker in (("bottleneck", BOTTLENECK_CONFIG), ("peft", PEFT_CONFIG), ("full", MODEL_CONFIG)):
        if (Path(path) / marker).is_file():
            return kind
    return None


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(run: Path, overrides: list[str] = ()) -> Config:
    """A run's saved config with the user's `overrides`. model.trust_remote_code is never taken from the
    run directory (anyone who can write there could make a reader run hub code): only an override sets it."""
    if not is_run(run):
        raise ModelError(f"{run}: not a run directory (no {CONFIG})")
    return load_config(Path(run) / CONFIG, ["model.trust_remote_code=false", *overrides])


def base_of(path: Path) -> str:
    """model.name of the base an adapter directory was trained on."""
    path = Path(path)
    if is_run(path):  # a run of ours: its config names the base as the user did
        return read_config(path).model.name
    if (path / BOTTLENECK_CONFIG).is_file():
        return json.loads((path / BOTTLENECK_CONFIG).read_text())["base"]
    return json.loads((path / PEFT_CONFIG).read_text())["base_model_name_or_path"]


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_labels(run: Path) -> tuple[list[str], str]:
    """A classification run's classes in head order, and whether they were ints or strings."""
    path = Path(run) / LABELS_FILE
    if not path.is_file():
        raise ModelError(f"{run}: no {LABELS_FILE}; not a classification run")
    d = json.loads(path.read_text())
    return d["labels"], d["type"]


def write_eval(out: Path, source: str, metrics: dict) -> None:
    """OUT/metrics.json in `sftlab eval`'s layout, so the report shows classification and seq2seq runs too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "models": {"model": {"source": source, "metrics": metrics}}, "delta": {}}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))


# --------------------------------------------------------------------------- the one loader


@dataclass
class Loaded:
    model: object  # in eval mode
    tokenizer: object
    base_name: str  # model.name of the base, for --base comparisons
    is_adapter: bool
    cfg: Config | None = None  # the run's config, when `source` is a run of ours


def load_run(source: str, task: str = "causal_lm", *, full_precision_base: bool = False, dtype=None,
             trust_remote_code: bool = False) -> Loaded:  # fmt: skip
    """A run directory (adapter or full model), an exported model directory, or (causal_lm) anything
    model.name accepts. Classification and seq2seq load their runs with their heads.

    dtype: of the full model or an adapter's base (default fp32; a 4-bit base keeps its own).
    trust_remote_code: the caller's (the user's) permission to run the base's hub code; a run's saved
    config never grants it (read_config).

    A qlora run's adapter goes on the 4-bit NF4 base it trained on; full_precision_base puts it on the
    original full-precision base instead (what `sftlab merge --into full-precision` folds into)."""
    path = Path(source)
    cfg = read_config(path, [f"model.trust_remote_code={str(trust_remote_code).lower()}"]) if is_run(path) else None
    if task != "causal_lm" and (cfg is None or cfg.task != task):
        raise ModelError(f"{path}: not a {task} run" + (f" (it is a {cfg.task} run)" if cfg else f" (no {CONFIG})"))
    kind = model_kind(path)
    if kind is None and path.is_dir():
        if cfg is not None:
            raise ModelError(f"{path}: no model saved (the run did not finish); finish it with `sftlab train --resume`")
        raise ModelError(f"{source}: neither a run directory (no {PEFT_CONFIG} or {MODEL_CONFIG}) nor a model")
    if kind is None:
        return _named_model(source, dtype)
    model, tokenizer, base = _load_dir(path, kind, cfg, task, full_precision_base, dtype)
    return Loaded(model.eval(), tokenizer, base, kind != "full", cfg)


def _load_dir(path: Path, kind: str, cfg: Config | None, task: str, full_precision_base: bool = False, dtype=None):
    import torch
    from transformers import AutoTokenizer

    from sftlab.model.load import load_4bit, load_model, load_weights, trains_on_4bit

    auto_cls, extra = _auto_class(task, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if kind == "full":
        model = load_weights(auto_cls, path, dtype=dtype or torch.float32, **extra)
        return model, tokenizer, cfg.model.name if cfg is not None else str(path)
    base_name = cfg.model.name if cfg is not None else base_of(path)
    base_cfg = cfg.model if cfg is not None else ModelConfig(name=base_name)
    if base_cfg.init == "random":
        raise ModelError(f"{path}: an adapter trained on a randomly initialized base (model.init=random) cannot be "
                         "loaded: that base was never saved. Train with train.method=full to keep the whole model.")  # fmt: skip
    if cfg is not None and kind == "peft" and trains_on_4bit(cfg) and not full_precision_base:
        base = load_4bit(base_cfg, auto_cls=auto_cls, **extra)  # the base the adapter trained with, not its original
    else:
        base = load_model(base_cfg, dtype, auto_cls=auto_cls, **extra)
    if kind == "bottleneck":
        from sftlab.model.methods import load_bottleneck

        return load_bottleneck(base, path), tokenizer, base_name
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)), tokenizer, base_name


def _auto_class(task: str, path: Path):
    """(auto class, from_pretrained kwargs) of a task's model."""
    import transformers

    if task == "classification":
        from sftlab.model.load import label_kwargs

        return transformers.AutoModelForSequenceClassification, label_kwargs(load_labels(path)[0])
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM, {}
    return transformers.AutoModelForCausalLM, {}


def _named_model(source: str, dtype=None) -> Loaded:
    from sftlab.model.load import load_model, load_tokenizer

    cfg = ModelConfig(name=source)
    return Loaded(load_model(cfg, dtype).eval(), load_tokenizer(cfg), source, False)


def read_compute(path: Path):
    """The precision path and attention kernel the run's model trained with (speed.as_trained.Compute),
    or None: not a run, one from before they were recorded, or a merged export of an adapter run (a
    model that run never computed)."""
    from sftlab.config import FROZEN_BASE
    from sftlab.speed.as_trained import from_record

    if not is_run(path) or (model_kind(path) == "full" and read_config(path).train.method in FROZEN_BASE):
        return None
    try:
        summary = json.loads((Path(path) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return from_record(summary.get("compute")) if isinstance(summary, dict) else None
