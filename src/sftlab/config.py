"""Typed run configuration: one YAML file per run plus `key.sub=value` overrides.

Every section is a dataclass; field metadata `help` documents the key. Loading is strict: an
unknown key or a bad value is an error that names the key, the allowed values and a close match.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sftlab.errors import ConfigError

Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"]

# What each train.method is, written once (the model, loss, speed and serving code ask these).
PEFT_METHODS = ("lora", "qlora", "adalora", "ia3", "prefix", "ptuning", "prompt")
PROMPT_LEARNING = ("prefix", "ptuning", "prompt")  # virtual tokens: the model's own forward and attention
FROZEN_BASE = PEFT_METHODS + ("adapter",)  # the base never trains: it can live in the compute dtype
MERGEABLE = ("lora", "qlora", "adalora", "ia3")


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DatasetSpec:
    path: str = _f("", help="file (.json/.jsonl/.parquet/.csv), directory or glob, or a save_to_disk directory")
    hf: str | None = _f(None, help="a Hugging Face dataset id (or a local dataset repository) instead of path")
    config: str | None = _f(None, help="hf: the dataset's configuration (subset) name")
    split: str | None = _f(None, help="hf / a saved DatasetDict: the split, slicing included (train[:10%]); default train")
    revision: str | None = _f(None, help="hf: a branch, tag or commit of the dataset repository")
    data_files: Any = _f(None, help="hf: the files to load (a path, a list, or {split: files})")
    format: Format = _f("auto", help="record layout; auto-detected from the first records")
    columns: dict[str, str] = _f(factory=dict, help="rename map {canonical_field: column_in_file}")
    name: str | None = _f(None, help="label in reports (default: the file name)")
    tools: list[dict[str, Any]] | str | None = _f(
        None, help="function schemas (a list, or a JSON string) offered in every record that names none")
    tags: dict[str, str] = _f(factory=dict, help="ShareGPT-like key and role names: role_tag, content_tag, user_tag, "
                                                 "assistant_tag, system_tag, observation_tag, function_tag")
    weight: float | None = _f(None, help="data.train: this dataset's share of each epoch (set on every dataset, or none)")
    epochs: float = _f(1.0, help="data.train: passes over this dataset per epoch (3: repeat a small set; 0.5: half)")
    max_examples: int | None = _f(None, help="a seeded sample of at most this many of the dataset's examples")
    loss_weight: float = _f(1.0, help="scales this dataset's tokens in the loss (times each record's loss_weight)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.hf:
            return self.hf + (f":{self.config}" if self.config else "") + (f"[{self.split}]" if self.split else "")
        return Path(self.path).name


@dataclass
class ModelConfig:
    name: str = _f(
        "smollm2-135m-instruct",
        help="alias smollm2-135m-instruct, a local HF directory, a .gguf file or a hub id",
    )
    revision: str | None = _f(None, help="hub revision (hub ids only)")
    trust_remote_code: bool = _f(False, help="allow model code from the hub")
    init: Literal["pretrained", "random"] = _f(
        "pretrained", help="random: the architecture of model.name (its config.json) with fresh weights")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = _f(factory=list, help="training datasets")
    eval: list[DatasetSpec] = _f(factory=list, help="evaluation datasets")
    template: str = _f(
        "auto",
        help="auto (tokenizer's chat template) | chatml | qwen | llama2 | llama3 | mistral | gemma | phi3 | deepseek "
             "| alpaca | Jinja string | .jinja file",
    )
    template_kwargs: dict[str, Any] = _f(
        factory=dict, help="arguments every render of the template gets (e.g. {enable_thinking: false}); saved with "
                           "the run's template, so inference renders alike")
    reasoning: Literal["train", "drop"] = _f(
        "train", help="assistant reasoning (reasoning_content, or <think> in content): train it, or drop it (counted)")
    system_prompt: str | None = _f(None, help="system message for conversations that have none")
    max_length: int = _f(2048, help="maximum tokens per example")
    overflow: Literal["truncate", "drop", "error"] = _f(
        "truncate", help="what to do with examples longer than max_length"
    )
    train_on: Literal["assistant", "last", "all"] = _f(
        "assistant", help="which tokens carry loss: every assistant turn, the last one, or all"
    )
    on_bad_record: Literal["error", "skip"] = _f(
        "error", help="stop at a malformed record, or skip it and count it in the report"
    )
    cache: bool = _f(True, help="cache tokenized datasets (keyed by data, tokenizer and settings)")
    num_proc: int | None = _f(None, help="processes that tokenize (default: the usable cores; 1: in this process)")
    eval_split: float = _f(0.0, help="fraction of train held out for eval when data.eval is empty")
    packing: bool = _f(False, help="pack each micro-batch into rows of max_length, examples isolated")
    padding_free: bool | Literal["auto"] = _f(
        "auto", help="each micro-batch as one unpadded row, examples isolated; auto: where flash-attention "
                     "varlen runs (CUDA, bf16/fp16), whose cost is then the real tokens', not the padded rows'")


@dataclass
class TrainConfig:
    method: Literal["full", "lora", "qlora", "adalora", "ia3", "prefix", "ptuning", "prompt", "adapter", "freeze"] = _f(
        "lora", help="full | lora | qlora | adalora | ia3 | prefix | ptuning | prompt | adapter | freeze")
    output_dir: str = _f("runs/default", help="where checkpoints, metrics and the model go")
    epochs: float = _f(1.0, help="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(-1, help="optimizer steps; -1 means use epochs")
    batch_size: int = _f(8, help="examples per micro-batch")
    grad_accum: int = _f(1, help="micro-batches per optimizer step")
    group_by_length: bool = _f(True, help="put examples of similar length in a step (less padding)")
    lr: float = _f(2e-4, help="peak learning rate")
    scheduler: Literal["cosine", "linear", "constant", "cosine_with_min_lr"] = _f(
        "cosine", help="learning-rate schedule after warm-up"
    )
    min_lr_ratio: float = _f(0.1, help="cosine_with_min_lr: final lr as a fraction of lr")
    warmup_ratio: float = _f(0.0, help="fraction of steps spent warming up")
    warmup_steps: int = _f(0, help="warm-up steps (overrides warmup_ratio when > 0)")
    weight_decay: float = _f(0.0, help="AdamW weight decay (never on biases and norms)")
    adam_beta1: float = _f(0.9, help="AdamW beta1")
    adam_beta2: float = _f(0.999, help="AdamW beta2")
    adam_eps: float = _f(1e-8, help="AdamW epsilon")
    max_grad_norm: float = _f(1.0, help="gradient clipping norm; 0 disables")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", help="auto picks bf16 where the hardware runs it fast (CPU avx512_bf16/AMX, recent GPUs)"
    )
    seed: int = _f(42, help="seed for data order, init and dropout")
    attention: Literal["auto", "model"] = _f(
        "auto", help="auto: fused causal kernels, per example when packed; model: the model's own attention"
    )
    logging_steps: int = _f(1, help="log train metrics every N optimizer steps")
    eval_steps: int = _f(0, help="evaluate every N steps (0: only at the end); needs eval data")
    early_stopping_patience: int = _f(0, help="stop after N evaluations without a better eval loss (0: off)")
    save_best: bool = _f(False, help="the final model is the one with the best eval loss")
    save_steps: int = _f(0, help="checkpoint every N steps (0: only on interrupt)")
    save_total_limit: int = _f(2, help="keep the newest N checkpoints (0: keep all)")
    on_nonfinite: Literal["error", "skip"] = _f(
        "error", help="a NaN/inf loss stops the run, or skips that step's update"
    )
    report_to: list[str] = _f(factory=lambda: ["tensorboard"], help="extra loggers: tensorboard, or []")
    gradient_checkpointing: bool = _f(False, help="recompute activations in backward: less memory, ~30% slower")
    compile: bool = _f(False, help="torch.compile each transformer block once (reused by every layer): "
                                    "fused elementwise kernels for compile time at the start")
    loss_chunk_tokens: int = _f(512, help="supervised tokens per cross-entropy chunk (bounds logits memory)")
    neftune_alpha: float = _f(0.0, help="NEFTune noise on input embeddings while training (0: off; 5 is usual)")
    sharding: Literal["none", "fsdp"] = _f(
        "none", help="fsdp: PyTorch's FSDP2 over the ranks torchrun starts, each transformer block sharded "
                     "(gloo on CPU, NCCL on GPUs); none: every rank holds the whole model (DDP)")  # fmt: skip
    fsdp_reshard_after_forward: bool = _f(
        True, help="fsdp: free each block's gathered weights after its forward; false keeps them for the "
                   "backward (one all-gather per micro-batch instead of two, more memory: ZeRO-2 style)")  # fmt: skip
    fsdp_blocks: list[str] = _f(factory=list, help="fsdp: class names of the modules sharded as units (default: "
                                                   "the model's _no_split_modules, its decoder layers)")  # fmt: skip


@dataclass
class LoraConfig:
    r: int = _f(16, help="adapter rank")
    alpha: float = _f(32.0, help="scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, help="dropout on the adapter input (0 skips drawing masks: faster)")
    target_modules: list[str] | str = _f("all-linear", help="modules to adapt, or all-linear")
    modules_to_save: list[str] = _f(factory=list, help="modules trained fully and saved with the adapter")
    use_dora: bool = _f(False, help="DoRA: weight-decomposed LoRA (magnitude + direction)")
    use_rslora: bool = _f(False, help="rank-stabilized scaling alpha/sqrt(r) instead of alpha/r")
    init: Literal["default", "gaussian", "pissa", "olora"] = _f(
        "default", help="adapter init: default (B=0), gaussian, pissa (principal singular vectors), olora (QR)")


@dataclass
class PeftConfig:
    num_virtual_tokens: int = _f(20, help="prefix / ptuning / prompt: virtual tokens")
    prefix_projection: bool = _f(False, help="prefix: reparameterize the prefix through an MLP (P-tuning v2: false)")
    encoder_hidden_size: int = _f(256, help="prefix projection / ptuning prompt-encoder width")
    adalora_init_r: int = _f(12, help="adalora: starting rank per matrix")
    adalora_target_r: int = _f(4, help="adalora: average rank after pruning")
    adalora_tinit: float = _f(0.1, help="adalora: fraction of steps before pruning starts")
    adalora_tfinal: float = _f(0.2, help="adalora: fraction of steps at the end with the final budget")
    adalora_delta_t: int = _f(1, help="adalora: steps between budget reallocations")
    adalora_orth_reg: float = _f(0.5, help="adalora: orthogonality regularizer weight")
    adapter_size: int = _f(64, help="adapter: bottleneck width of each Houlsby adapter")
    freeze_layers: int = _f(2, help="freeze: train only the last N decoder layers")
    freeze_modules: list[str] = _f(factory=list, help="freeze: also train these modules (e.g. lm_head, norm)")


@dataclass
class ClassificationConfig:
    labels: list[str] = _f(factory=list, help="class names in id order (default: the training labels, sorted)")
    class_weights: Literal["none", "balanced"] = _f(
        "none", help="balanced: weight each class by n / (classes x its count) against imbalance")


@dataclass
class Seq2SeqConfig:
    source_prefix: str = _f("", help="text put before every source (T5 style, e.g. 'translate English to German: ')")
    max_target_length: int = _f(256, help="maximum target tokens (data.max_length bounds the source)")
    num_beams: int = _f(1, help="beam width when translating and evaluating (1: greedy)")


TaskType = Literal["multiple_choice", "exact_match", "code", "generation"]
# Tasks whose data ships in a package (sftlab.evaluate.benchmarks reads them): name -> type.
BUILTIN_TASKS = {"humaneval": "code"}


@dataclass
class TaskSpec:
    path: str | None = _f(None, help="JSONL task file (layouts: MMLU, GSM8K, HumanEval, or prompt/reference); "
                                     "none for a built-in task (name: humaneval)")  # fmt: skip
    type: TaskType | None = _f(None, help="multiple_choice | exact_match | code | generation (built-ins know theirs)")
    name: str | None = _f(None, help="label in tables (default: the file name without suffix); without a path, "
                                     "the built-in task: humaneval")  # fmt: skip
    limit: int = _f(0, help="use only the first N items (0: eval.limit, else all)")
    protocol: Literal["chat", "completion", "both"] | None = _f(
        None, help="code tasks: chat (instruction, reply's code block), completion (the prompt continued raw, cut at "
                   "the HumanEval paper's stop sequences) or both; default chat, both for humaneval")  # fmt: skip

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    @property
    def protocols(self) -> list[str]:
        chosen = self.protocol or ("both" if self.path is None else "chat")
        return ["chat", "completion"] if chosen == "both" else [chosen]


@dataclass
class EvalConfig:
    tasks: list[TaskSpec] = _f(factory=list, help="benchmark-style task files run by `sftlab eval`")
    limit: int = _f(0, help="use only the first N items of each task without its own limit (0: all)")
    max_examples: int = _f(64, help="eval-data conversations answered for generation metrics (0: all)")
    max_new_tokens: int = _f(128, help="tokens generated per answer")
    temperature: float = _f(0.0, help="sampling temperature; 0 is greedy")
    top_p: float = _f(1.0, help="nucleus sampling mass")
    num_samples: int = _f(1, help="answers per code problem, for pass@k")
    pass_k: list[int] = _f(factory=lambda: [1], help="k values reported for code tasks (each <= num_samples)")
    batch_size: int = _f(8, help="prompts generated (or choices scored) together")
    seed: int = _f(0, help="seed for sampled generation")
    semantic: bool = _f(True, help="embedding similarity with the bundled all-MiniLM-L6-v2 encoder")
    bertscore: bool = _f(True, help="BERTScore (bert-score) on the bundled all-MiniLM-L6-v2: not comparable with "
                                    "the usual roberta-large BERTScores")  # fmt: skip
    bertscore_layer: int = _f(6, help="the all-MiniLM-L6-v2 layer BERTScore reads (0 embeddings .. 6 last); 6: the "
                                      "layer its similarity training shaped")  # fmt: skip
    meteor: bool = _f(True, help="METEOR (nltk) with WordNet from $SFTLAB_WORDNET or Debian's wordnet-base")
    code_timeout: float = _f(10.0, help="seconds a code candidate may run")
    code_memory_mb: int = _f(1024, help="address-space limit for a code candidate")
    generate_every: int = _f(0, help="during training: answer a few eval prompts every N steps (0: off)")
    generate_examples: int = _f(4, help="eval prompts answered at each generate_every step")


@dataclass
class Config:
    task: Literal["causal_lm", "classification", "seq2seq"] = _f(
        "causal_lm", help="causal_lm (chat SFT) | classification (encoder or decoder + head) | seq2seq (translation)")
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    lora: LoraConfig = _f(factory=LoraConfig)
    peft: PeftConfig = _f(factory=PeftConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    classification: ClassificationConfig = _f(factory=ClassificationConfig)
    seq2seq: Seq2SeqConfig = _f(factory=Seq2SeqConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML run file (dataset paths relative to it), apply overrides, build and validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _resolve_data_paths(raw, path.parent)
    for item in overrides:
        apply_override(raw, item)
    cfg = build(Config, raw, "")
    # Absolute paths make the saved config.yaml of a run valid from any directory.
    for spec in cfg.data.train + cfg.data.eval + cfg.eval.tasks:
        if spec.path:  # a hub dataset has none
            spec.path = os.path.abspath(os.path.expanduser(spec.path))
    validate(cfg)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set `key.sub=value` in the raw mapping; the value is parsed as YAML (so 3, true, [a, b] work)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _resolve_data_paths(raw: dict, base: Path) -> None:
    # Paths written in a YAML file are relative to that file, so configs run from any directory.
    if isinstance(raw.get("eval"), dict):
        _rebase_list(raw["eval"], ("tasks",), base)
    model = raw.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(name, str) and not Path(name).is_absolute() and (base / name).exists():  # a model dir beside the file
        model["name"] = str(base / name)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    _rebase_list(data, ("train", "eval"), base)
    tpl = data.get("template")
    if isinstance(tpl, str) and tpl.endswith((".jinja", ".j2")):
        data["template"] = _rebase(tpl, base)


def _rebase_list(section: dict, keys: tuple[str, ...], base: Path) -> None:
    for key in keys:
        specs = section.get(key)
        if isinstance(specs, (str, dict)):
            specs = section[key] = [specs]
        for i, spec in enumerate(specs if isinstance(specs, list) else []):
            if isinstance(spec, str):
                specs[i] = spec = {"path": spec}
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                spec["path"] = _rebase(spec["path"], base)


def _rebase(p: str, base: Path) -> str:
    return p if Path(p).is_absolute() else str(base / p)


def build(cls: type, raw: Any, where: str) -> Any:
    """Turn a raw mapping into dataclass `cls`, checking every key and value type."""
    if cls is DatasetSpec and isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, full)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if cls is DatasetSpec and not ({"path", "hf"} & set(kwargs)):
        missing = ["path"]
    if missing:
        raise ConfigError(f"{where}: missing required key '{missing[0]}'")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        options = [a for a in args if a is not type(None)]
        # Try the member whose shape the value already has first: "all-linear" stays a str, not [str].
        options.sort(key=lambda a: (typing.get_origin(a) is list) != isinstance(value, list))
        for arg in options:
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: {value!r} is not allowed{hint} (allowed: {', '.join(map(str, args))})"
            )
        return value
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    return _scalar(tp, value, where)


def _scalar(tp: type, value: Any, where: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string; accept it as the number it means
            return tp(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.data.max_length >= 8, "data.max_length must be at least 8"),
        (cfg.train.batch_size >= 1, "train.batch_size must be at least 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (cfg.train.lr > 0, "train.lr must be positive"),
        (0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 disables clipping)"),
        (cfg.train.epochs > 0 or cfg.train.max_steps > 0, "set train.epochs > 0 or train.max_steps > 0"),
        (cfg.lora.r >= 1, "lora.r must be at least 1"),
        (0 <= cfg.data.eval_split < 1, "data.eval_split must be in [0, 1)"),
        (cfg.data.num_proc is None or cfg.data.num_proc >= 1, "data.num_proc must be at least 1 (or unset: the cores)"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]"),
        (cfg.train.logging_steps >= 1, "train.logging_steps must be at least 1"),
        (cfg.train.loss_chunk_tokens >= 1, "train.loss_chunk_tokens must be at least 1"),
        (not (cfg.train.save_best or cfg.train.early_stopping_patience) or _has_eval(cfg),
         "train.save_best and train.early_stopping_patience need eval data (data.eval or data.eval_split)"),
        (set(cfg.train.report_to) <= {"tensorboard"}, "train.report_to takes only: tensorboard"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (cfg.train.neftune_alpha >= 0, "train.neftune_alpha must be >= 0"),
        (cfg.peft.num_virtual_tokens >= 1 and cfg.peft.adapter_size >= 1, "peft sizes must be at least 1"),
        (not (cfg.data.packing and cfg.train.method in PROMPT_LEARNING),
         "data.packing does not combine with prefix/ptuning/prompt (virtual tokens would join packed examples)"),
        (not (cfg.data.padding_free is True and cfg.train.method in PROMPT_LEARNING),
         "data.padding_free does not combine with prefix/ptuning/prompt (virtual tokens would join the examples)"),
        (not (cfg.data.padding_free is True and cfg.data.packing),
         "data.packing and data.padding_free=true: choose one (packing fills rows of max_length, padding_free "
         "makes one row of the whole micro-batch)"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be at least 1"),
        (cfg.eval.temperature >= 0, "eval.temperature must be >= 0 (0 is greedy)"),
        (0 < cfg.eval.top_p <= 1, "eval.top_p must be in (0, 1]"),
        (cfg.eval.batch_size >= 1 and cfg.eval.num_samples >= 1, "eval.batch_size and eval.num_samples must be >= 1"),
        (all(1 <= k <= cfg.eval.num_samples for k in cfg.eval.pass_k),
         "every eval.pass_k must be between 1 and eval.num_samples (raise eval.num_samples for pass@k > 1)"),
        (cfg.eval.num_samples == 1 or cfg.eval.temperature > 0,
         "eval.num_samples > 1 needs eval.temperature > 0 (greedy answers are all the same)"),
        (cfg.eval.code_timeout > 0 and cfg.eval.code_memory_mb >= 64,
         "eval.code_timeout must be > 0 and eval.code_memory_mb >= 64"),
        (cfg.eval.limit >= 0, "eval.limit must be >= 0 (0: every item)"),
        (cfg.eval.generate_every >= 0 and cfg.eval.generate_examples >= 1,
         "eval.generate_every must be >= 0 and eval.generate_examples >= 1"),
    ]
    for ok, message in checks + _task_checks(cfg) + _sharding_checks(cfg):
        if not ok:
            raise ConfigError(message)
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            _check_spec(spec, f"data.{split}[{i}]", split)
    for i, task in enumerate(cfg.eval.tasks):
        _check_task(task, f"eval.tasks[{i}]")
    if cfg.eval.generate_every and not cfg.data.eval:
        raise ConfigError("eval.generate_every needs data.eval (conversations whose last assistant turn is the reference)")


def _check_spec(spec: DatasetSpec, where: str, split: str) -> None:
    checks = [
        (bool(spec.path) != bool(spec.hf),
         f"{where}: give a path (files, or a save_to_disk directory) or hf: org/name (a hub dataset), one of them"),
        (spec.hf is not None or (spec.config is None and spec.revision is None and spec.data_files is None),
         f"{where}: config, revision and data_files are for hub datasets (hf: org/name)"),
        (spec.weight is None or spec.weight >= 0, f"{where}.weight must be >= 0"),
        (spec.epochs >= 0, f"{where}.epochs must be >= 0"),
        (spec.max_examples is None or spec.max_examples >= 1, f"{where}.max_examples must be at least 1"),
        (math.isfinite(spec.loss_weight) and spec.loss_weight > 0, f"{where}.loss_weight must be a number above 0"),
        (split == "train" or (spec.weight is None and spec.epochs == 1),
         f"{where}: weight and epochs shape the training mixture; an eval set is used whole (max_examples caps it)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_task(spec: TaskSpec, where: str) -> None:
    """A task is a file with its type, or a built-in by name; the type of a built-in is its own."""
    builtin = BUILTIN_TASKS.get(spec.name) if spec.path is None else None
    checks = [
        (spec.path is not None or builtin is not None,
         f"{where}: give path and type (a task file), or name one of the built-in tasks: {', '.join(BUILTIN_TASKS)}"),
        (spec.path is None or spec.type is not None, f"{where}: a task file needs its type ({', '.join(TaskType.__args__)})"),
        (builtin is None or spec.type in (None, builtin), f"{where}: {spec.name} is a {builtin} task (drop type)"),
        (spec.protocol is None or (spec.type or builtin) == "code", f"{where}.protocol is for code tasks"),
        (spec.limit >= 0, f"{where}.limit must be >= 0"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if builtin is not None:
        spec.type = builtin


def _task_checks(cfg: Config) -> list[tuple[bool, str]]:
    if cfg.task == "causal_lm":
        return []
    t = cfg.task
    return [
        (cfg.train.method in ("full", "lora"), f"task {t} trains with train.method full or lora (got {cfg.train.method})"),
        (not cfg.data.packing and cfg.data.padding_free is not True,
         f"data.packing and data.padding_free are for causal_lm; task {t} pads its batches"),
        (not cfg.eval.generate_every, f"eval.generate_every is for causal_lm; task {t} reports its metrics at each eval"),
        (not cfg.eval.tasks, f"eval.tasks (benchmark files) are for causal_lm, not task {t}"),
        (cfg.seq2seq.max_target_length >= 1 and cfg.seq2seq.num_beams >= 1,
         "seq2seq.max_target_length and seq2seq.num_beams must be at least 1"),
    ]  # fmt: skip


def _sharding_checks(cfg: Config) -> list[tuple[bool, str]]:
    """What train.sharding=fsdp covers: full and LoRA fine-tuning of a causal LM; the rest is refused by
    name rather than run untested."""
    t = cfg.train
    if t.sharding != "fsdp":  # train.fsdp_* are kept as they are: a resume on one process reads them unused
        return []
    return [
        (cfg.task == "causal_lm" and t.method in ("full", "lora"),
         f"train.sharding=fsdp trains causal_lm with train.method full or lora (got {cfg.task}, {t.method})"),
    ]  # fmt: skip


def _has_eval(cfg: Config) -> bool:
    return bool(cfg.data.eval) or cfg.data.eval_split > 0


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key, for `sftlab config --keys`."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            rows += describe(ftype, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
