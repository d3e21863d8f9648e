"""`sftlab export --format hf`: the merged model in 16 bits (what vLLM and TGI load) or quantized by
bitsandbytes (int8, nf4: smaller on disk, reloaded by from_pretrained), checked before it is kept, and the
`vllm serve` lines for it and for the run's adapter."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftlab.export import check, vllm
from sftlab.export.merge import ExportError, copy_run_files, merge
from sftlab.model.load import load_weights

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# bitsandbytes types: the dtype of the modules they leave unquantized (LLM.int8 computes in fp16; NF4 as QLoRA's).
QUANTIZED = {"int8": torch.float16, "nf4": torch.bfloat16}


@dataclass
class HfExport:
    path: Path
    dtype: str
    size_bytes: int
    checks: list[check.Comparison] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # how to serve it with vLLM
    notes: list[str] = field(default_factory=list)
    eval_loss: dict[str, float] = field(default_factory=dict)  # bitsandbytes types: {"unquantized", quant}


def export_hf(run_dir: str, output: str, dtype: str = "bf16", prompts: list[list[dict]] | None = None,
              max_new_tokens: int = 48, say=print) -> HfExport:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from sftlab.rundir import load_run

    if dtype not in DTYPES and dtype not in QUANTIZED:
        raise ExportError(f"--quant {dtype}: --format hf writes {', '.join(DTYPES)} or, with bitsandbytes, "
                          f"{', '.join(QUANTIZED)}")  # fmt: skip
    loaded = load_run(run_dir)
    out = Path(output)
    data = _run_eval_data(loaded) if dtype in QUANTIZED else None
    eval_before = None
    if dtype in QUANTIZED:
        bnb = _bnb_config(dtype)  # before any work: bitsandbytes must be there
        with tempfile.TemporaryDirectory(prefix=".unquantized-", dir=out.parent) as staged:
            unquantized = _write_merged(run_dir, loaded, Path(staged), "f32")
            model = load_weights(AutoModelForCausalLM, unquantized, dtype=QUANTIZED[dtype], quantization_config=bnb)
            model.save_pretrained(out, safe_serialization=True)
            if data is not None:
                full = load_weights(AutoModelForCausalLM, unquantized, dtype=torch.float32)
                eval_before = _eval_loss(loaded, full, data)
            for name in ("config.json", "model.safetensors", "model.safetensors.index.json"):
                (Path(staged) / name).unlink(missing_ok=True)  # everything else (tokenizer, run files) travels
            shutil.copytree(staged, out, dirs_exist_ok=True)
    else:
        _write_merged(run_dir, loaded, out, dtype)
    result = HfExport(out, dtype, sum(f.stat().st_size for f in out.glob("*.safetensors")))
    # read back as a user would: bitsandbytes types by the quantization_config saved in config.json
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32 if dtype in DTYPES else "auto")
    if eval_before is not None:
        result.eval_loss = {"unquantized": eval_before, dtype: _eval_loss(loaded, exported, data)}
    try:
        result.checks = check.against_tuned(loaded, [("transformers", lambda stop: exported)], dtype, prompts,
                                            max_new_tokens, say)  # fmt: skip
    except ExportError as e:
        shutil.rmtree(out)
        losses = (f"; eval loss {result.eval_loss[dtype]:.4f} against {eval_before:.4f} unquantized"
                  if result.eval_loss else "")  # fmt: skip
        hint = ("; a small model, or a fine-tune whose change is below NF4's rounding step (a QLoRA adapter merged "
                "into its NF4 base), loses it in 4 bits: export int8 or bf16, or serve the run directory (the "
                "adapter on its base)") if dtype == "nf4" else ""  # fmt: skip
        raise ExportError(f"{e}{losses}{hint}") from None
    result.commands, result.notes = serve_lines(run_dir, loaded, out)
    if dtype in QUANTIZED and eval_before is None:
        result.notes.append("eval loss not compared: the run has no eval data (data.eval or data.eval_split)")
    return result


def _write_merged(run_dir: str, loaded, out: Path, dtype: str) -> Path:
    """The merged model (adapter folded in) or the full model, with its tokenizer and run files, in `dtype`."""
    from transformers import AutoModelForCausalLM

    if loaded.is_adapter:
        merge(run_dir, str(out))
        model = load_weights(AutoModelForCausalLM, out, dtype=torch.float32)
    else:  # read again: casting loaded.model would change the reference the export is checked against
        model = load_weights(AutoModelForCausalLM, run_dir, dtype=torch.float32)
        loaded.tokenizer.save_pretrained(out)
        copy_run_files(run_dir, out)
    model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    return out


def _bnb_config(quant: str):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ExportError(f"--quant {quant} needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from None
    from transformers import BitsAndBytesConfig

    from sftlab.model.methods import quantization_config

    return BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else quantization_config()


def _run_eval_data(loaded):
    """The run's tokenized eval data (None when it has none), read once for both models."""
    from sftlab.evaluate.runner import eval_data

    return eval_data(loaded.cfg, loaded.tokenizer) if loaded.cfg is not None else None


def _eval_loss(loaded, model, data) -> float:
    """Eval loss of `model` on `data`, as `sftlab eval` computes it."""
    from sftlab.evaluate.runner import loss_of

    return loss_of(model, loaded.cfg, data, loaded.tokenizer)["eval_loss"]


def serve_lines(run_dir: str, loaded, merged_dir: Path) -> tuple[list[str], list[str]]:
    """`vllm serve` for the merged model, and for the adapter on its base when vLLM accepts the adapter."""
    import shlex

    from sftlab.model.load import resolve_model_dir

    template = merged_dir / "chat_template.jinja"
    flags = ["--chat-template", str(template.resolve())] if template.is_file() else []
    commands = [shlex.join(["vllm", "serve", str(merged_dir.resolve()), *flags])]
    notes = []
    if loaded.is_adapter:
        found = vllm.check_adapter(run_dir)
        notes += [f"vLLM adapter: {w}" for w in found.warnings]
        if found.ok:
            base = resolve_model_dir(loaded.base_name)
            line = vllm.serve_command(base, run_dir, Path(run_dir).resolve().name, found.rank)
            commands.append(line + (" " + shlex.join(flags) if flags else ""))
        else:
            notes += [f"vLLM would refuse the adapter: {p}" for p in found.problems]
    return commands, notes
