"""Check, without loading any weights, that a PEFT LoRA run directory is what vLLM's LoRA loader accepts,
and write the `vllm serve` command that serves it.

What vLLM requires (read in vLLM 0.33.0, the wheel on PyPI; file paths are inside its `vllm/` package):
- adapter_config.json must give r, lora_alpha and target_modules; fields vLLM does not know are ignored (lora/peft_helper.py).
- Only LoRA: IA3, prefix and prompt configs lack r/lora_alpha; AdaLoRA's lora_E tensors do not parse (peft_helper.py, lora/utils.py).
- Tensors come from adapter_model.safetensors (else .bin/.pt); none at all is an error (lora/lora_model.py).
- Every tensor name must end in lora_A.weight/lora_B.weight, or lora_embedding_A/B for embeddings (utils.py parse_fine_tuned_lora_name).
- A leading `base_model.model.` is stripped; the last path part names the module (utils.py, lora_model.py).
- Copies of the base embeddings (`embed_tokens.base_layer.weight`, `lm_head.base_layer.weight`) are skipped (utils.py is_base_embedding_weights).
- Each module's suffix must be one vLLM's model wraps, packed parts expanded: qkv_proj from q/k/v_proj, gate_up_proj from gate/up_proj (lora/worker_manager.py).
- The wrapped modules are a model's linear layers plus its `embedding_modules` (utils.py get_supported_lora_modules, model_executor/models/*.py).
- embed_tokens/lm_head LoRA: Llama and Qwen3 list them; Mistral and Qwen2 list none (models/llama.py, mistral.py, qwen2.py, qwen3.py).
- target_modules naming a module with no tensors is tolerated: the tensors are the source of truth (lora_model.py).
- modules_to_save is refused, except classifier/score heads on a classification model (peft_helper.py, lora_model.py, lora/model_manager.py).
- use_dora is refused (peft_helper.py); so are lora_bias, aLoRA, layer_replication, BD-LoRA and QALoRA (peft_helper.py).
- bias must be "none": "Adapter bias is not supported" (peft_helper.py validate_legal).
- init_lora_weights pissa/olora/corda/loftq is refused: they change the base weights (peft_helper.py _init_is_supported).
- The largest of r and rank_pattern must be <= --max-lora-rank, one of 1 8 16 32 64 128 256 320 512, default 16 (config/lora.py).
- use_rslora is honoured (scale alpha/sqrt(r)), as are rank_pattern and alpha_pattern (peft_helper.py).
- An embedding LoRA must span exactly the base vocabulary: no extra vocabulary any more (lora_model.py; config/lora.py dropped lora_extra_vocab_size).
- The architecture must implement SupportsLoRA, else `--enable-lora` is refused at start (config/lora.py).
- Each adapter is served with the base model's tokenizer, chat template and generation config (lora/request.py has no tokenizer;
  config/model.py generation_config="auto"); --chat-template and --generation-config change them for the whole server.
- `--lora-modules NAME=PATH` is the plain form; a name with '=' or a ',' anywhere needs the JSON form (entrypoints/common/cli_args.py).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# vLLM's MaxLoRARanks: --max-lora-rank takes only these.
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights strings that only set the starting weights: the saved adapter is a plain LoRA.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
CLASSIFIER_HEADS = ("classifier", "score")
LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_embedding_A",
    ".lora_embedding_B",
)
UNSUPPORTED = (
    "lora_bias",
    "alora_invocation_tokens",
    "layer_replication",
    "use_bdlora",
    "use_qalora",
)
_LINEAR = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
# The adapter-side module names vLLM wraps, per architecture: only those read in its source.
SUPPORTED_MODULES = {
    "LlamaForCausalLM": _LINEAR | _EMBEDDINGS,
    "Qwen3ForCausalLM": _LINEAR | _EMBEDDINGS,
    "MistralForCausalLM": _LINEAR,
    "Qwen2ForCausalLM": _LINEAR,
}
MERGE_HINT = "or `sftlab merge` the run and serve the merged model"


@dataclass
class VllmCheck:
    """What vLLM would make of an adapter: problems make it refuse the adapter; warnings it
    tolerates."""

    # The largest rank in the adapter (r or rank_pattern): what --max-lora-rank must cover.
    rank: int
    alpha: float
    # Module names that carry LoRA tensors, as vLLM matches them (the last part of the path).
    target_modules: list[str]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_adapter(adapter_dir) -> VllmCheck:
    """Read adapter_config.json and the tensor names and shapes of adapter_model.safetensors."""
    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        full = (d / "config.json").is_file()
        what = (
            "holds a full model: serve it with `vllm serve DIR`"
            if full
            else "is no adapter"
        )
        return VllmCheck(0, 0.0, [], [f"{d}: no adapter_config.json; it {what}"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    rank = max([cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()])
    check = VllmCheck(rank, cfg.get("lora_alpha") or 0.0, [])
    check.problems += _config_problems(cfg, rank)
    if cfg.get("peft_type", "LORA") != "LORA":
        return check  # the tensors of another method say nothing more
    shapes = _tensor_shapes(d, check)
    modules = {_lora_module(n) for n in shapes} - {None}
    check.target_modules = sorted({m.rsplit(".", 1)[-1] for m in modules})
    check.problems += _tensor_problems(shapes, cfg)
    base = cfg.get("base_model_name_or_path")
    base_config = _base_config(base)
    _check_modules(check, base_config)
    _check_vocab(check, shapes, base_config)
    _check_heads(check, cfg)
    check.warnings += _served_with_base_files(
        d, Path(base).expanduser() if base else None
    )
    return check


def serve_command(base_model: str, adapter_dir, name: str, rank: int) -> str:
    """`vllm serve` with the adapter loaded at start as model `name`, the rank rounded up to
    one that vLLM accepts."""
    from sftlab.export.merge import ExportError

    fits = [r for r in ALLOWED_RANKS if r >= rank]
    if not fits:
        raise ExportError(
            f"rank {rank} is above {ALLOWED_RANKS[-1]}, the largest --max-lora-rank vLLM accepts"
        )
    # Absolute: vLLM takes a relative path that does not exist where it runs for a hub id.
    path = str(Path(adapter_dir).resolve())
    spec = f"{name}={path}"
    # vLLM splits the plain form at the first '=', and reads anything with a ',' as JSON.
    if "=" in name or "," in spec:
        spec = json.dumps({"name": name, "path": path})
    rank_arg = str(fits[0])
    cmd = [
        "vllm",
        "serve",
        base_model,
        "--enable-lora",
        "--lora-modules",
        spec,
        "--max-lora-rank",
        rank_arg,
    ]
    return shlex.join(cmd)


def _config_problems(cfg: dict, rank: int) -> list[str]:
    """The adapter_config.json fields vLLM refuses, each with what to retrain with."""
    if cfg.get("peft_type", "LORA") != "LORA":
        kind = cfg["peft_type"]
        return [
            f"peft_type={kind!r}: vLLM serves only LoRA; retrain with train.method=lora {MERGE_HINT}"
        ]
    out = [
        f"adapter_config.json has no {k}: vLLM requires it"
        for k in ("r", "lora_alpha", "target_modules")
        if k not in cfg
    ]
    if rank > ALLOWED_RANKS[-1]:
        out.append(
            f"rank {rank} is above {ALLOWED_RANKS[-1]}, the largest --max-lora-rank vLLM accepts; "
            f"retrain with lora.r<={ALLOWED_RANKS[-1]} {MERGE_HINT}"
        )
    saved = [m for m in cfg.get("modules_to_save") or [] if m not in CLASSIFIER_HEADS]
    if saved:
        out.append(
            f"modules_to_save={saved}: vLLM loads no fully trained modules into a language model; "
            f"retrain with lora.modules_to_save=[] {MERGE_HINT}"
        )
    if cfg.get("use_dora"):
        out.append(
            f"use_dora=true: vLLM does not support DoRA; retrain with lora.use_dora=false {MERGE_HINT}"
        )
    if cfg.get("bias", "none") != "none":
        out.append(
            f"bias={cfg['bias']!r}: vLLM loads no adapter biases; "
            f"retrain with bias='none' (sftlab's lora) {MERGE_HINT}"
        )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        out.append(
            f"init_lora_weights={init!r}: this init changes the base weights, which vLLM serves "
            f"unchanged; retrain with lora.init=default or gaussian {MERGE_HINT}"
        )
    out += [
        f"{k}={cfg[k]!r}: vLLM does not support it; retrain without it {MERGE_HINT}"
        for k in UNSUPPORTED
        if cfg.get(k)
    ]
    return out


def _tensor_shapes(d: Path, check: VllmCheck) -> dict[str, list[int]]:
    from safetensors import safe_open

    path = d / "adapter_model.safetensors"
    if not path.is_file():
        if any((d / f"adapter_model.{ext}").is_file() for ext in ("bin", "pt")):
            check.warnings.append(
                "adapter_model.bin/.pt: vLLM loads it; its tensors were not checked"
            )
        else:
            check.problems.append(
                f"{d}: no adapter_model.safetensors; vLLM finds no tensors"
            )
        return {}
    # Only the header is read: names and shapes, no weights.
    with safe_open(path, framework="pt") as f:
        names = list(f.keys())  # a safe_open handle is not iterable
        return {name: f.get_slice(name).get_shape() for name in names}


def _lora_module(name: str) -> str | None:
    """The module path a LoRA factor belongs to, as vLLM parses it; None for other tensors."""
    for suffix in LORA_SUFFIXES:
        if name.endswith(suffix):
            return name.removeprefix("base_model.model.")[: -len(suffix)]
    return None


def _tensor_kind(name: str) -> str:
    """How vLLM reads a tensor name: a LoRA factor, a base embedding it skips, a classifier
    head, or something it cannot parse."""
    if _lora_module(name) is not None:
        return "lora"
    if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
        return "base_embedding"
    parts = name.split(".")
    if (
        len(parts) >= 2
        and parts[-2] in CLASSIFIER_HEADS
        and parts[-1] in ("weight", "bias")
    ):
        return "head"
    return "unknown"


def _tensor_problems(shapes: dict, cfg: dict) -> list[str]:
    """Tensors vLLM cannot parse, less those a config problem already reports."""
    bad = [n for n in shapes if _tensor_kind(n) == "unknown" and not _reported(n, cfg)]
    if not bad:
        return []
    # PEFT's trainable tokens store a delta per token, which vLLM has no layer for.
    tokens = any("trainable_tokens" in n for n in bad)
    fix = "without trainable_token_indices" if tokens else "as a plain LoRA"
    problem = (
        f"tensors that are no LoRA A/B weights ({len(bad)}, e.g. {bad[0]}): vLLM refuses them; "
        f"retrain {fix} {MERGE_HINT}"
    )
    return [problem]


def _reported(name: str, cfg: dict) -> bool:
    # A saved module's tensor is named like base_model.model.lm_head.weight.
    marks = [f".{m}." for m in cfg.get("modules_to_save") or []]
    marks += [".lora_magnitude_vector"] if cfg.get("use_dora") else []
    marks += [".lora_B.bias"] if cfg.get("lora_bias") else []
    return any(m in name for m in marks)


def _base_config(base: str | None) -> dict | None:
    """The base model's config.json when the adapter names a local directory (no hub access)."""
    path = Path(base).expanduser() / "config.json" if base else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _check_modules(check: VllmCheck, base: dict | None) -> None:
    arch = ((base or {}).get("architectures") or ["unknown"])[0]
    supported = SUPPORTED_MODULES.get(arch)
    if supported is None:
        check.warnings.append(
            f"target modules {check.target_modules} not checked: this check does not know "
            f"architecture {arch}; vLLM refuses modules its implementation does not wrap"
        )
        return
    keep = sorted(supported & set(check.target_modules)) or sorted(_LINEAR)
    for module in sorted(set(check.target_modules) - supported):
        check.problems.append(
            f"target module {module}: vLLM's {arch} has no LoRA layer for it; "
            f"retrain with lora.target_modules={keep}"
        )


def _check_vocab(check: VllmCheck, shapes: dict, base: dict | None) -> None:
    """An embedding LoRA must match the base vocabulary; copies of the base embeddings are skipped."""
    vocab = (base or {}).get("vocab_size")
    for name, shape in shapes.items():
        if name.endswith(".lora_embedding_A") and vocab and shape[1] != vocab:
            check.problems.append(
                f"{name} spans {shape[1]} tokens but the base model has {vocab}: vLLM serves no "
                "added vocabulary; train without resizing the embeddings"
            )
    copies = [n for n in shapes if _tensor_kind(n) == "base_embedding"]
    if copies:
        check.warnings.append(
            f"copies of the base embeddings ({len(copies)}, e.g. {copies[0]}) are skipped by vLLM: "
            "it serves the base model's embeddings and vocabulary"
        )


def _check_heads(check: VllmCheck, cfg: dict) -> None:
    heads = [m for m in cfg.get("modules_to_save") or [] if m in CLASSIFIER_HEADS]
    if heads:
        check.warnings.append(
            f"modules_to_save={heads}: vLLM loads a classifier head only when the base model is "
            "served as a classification (pooling) model, and one head per adapter"
        )


def _served_with_base_files(d: Path, base_dir: Path | None) -> list[str]:
    """vLLM formats prompts and stops generating by the base model's files, never the
    adapter's: say so where the run's differ."""
    out = []
    template = d / "chat_template.jinja"
    if template.is_file() and _text(template) != _template(base_dir):
        out.append(
            "vLLM formats chats with the base model's template, not this run's: "
            f"serve with --chat-template {shlex.quote(str(template.resolve()))}"
        )
    if (d / "generation_config.json").is_file() and _stops(d) != _stops(base_dir):
        out.append(
            "vLLM stops at the base model's eos_token_id, not this run's end of turn: "
            f"serve with --generation-config {shlex.quote(str(d.resolve()))}"
        )
    return out


def _text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _template(model_dir: Path | None) -> str | None:
    """A model directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    if model_dir is None:
        return None
    found = _text(model_dir / "chat_template.jinja")
    if found is None and (model_dir / "tokenizer_config.json").is_file():
        found = json.loads(_text(model_dir / "tokenizer_config.json")).get(
            "chat_template"
        )
    return found


def _stops(model_dir: Path | None):
    text = _text(model_dir / "generation_config.json") if model_dir else None
    return json.loads(text).get("eos_token_id") if text else None
