"""`sftlab export --format hf`: the merged model in 16 bits (what vLLM and TGI load), checked before it is kept,
and the `vllm serve` lines for it and for the run's adapter."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sftlab.export import check, vllm
from sftlab.export.merge import ExportError, copy_run_files, merge

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@dataclass
class HfExport:
    path: Path
    dtype: str
    size_bytes: int
    checks: list[check.Comparison] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # how to serve it with vLLM
    notes: list[str] = field(default_factory=list)


def export_hf(run_dir: str, output: str, dtype: str = "bf16", prompts: list[list[dict]] | None = None,
              max_new_tokens: int = 48, say=print) -> HfExport:  # fmt: skip
    from transformers import AutoModelForCausalLM

    from sftlab.rundir import load_run

    if dtype not in DTYPES:
        raise ExportError(f"--quant {dtype}: --format hf writes {', '.join(DTYPES)}")
    loaded = load_run(run_dir)
    out = Path(output)
    if loaded.is_adapter:
        merge(run_dir, output)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        model = loaded.model
        loaded.tokenizer.save_pretrained(out)
        copy_run_files(run_dir, out)
    model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    del model
    result = HfExport(out, dtype, sum(f.stat().st_size for f in out.glob("*.safetensors")))
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the 16-bit weights, read back
    try:
        result.checks = check.against_tuned(loaded, [("transformers", lambda stop: exported)], dtype, prompts,
                                            max_new_tokens, say)  # fmt: skip
    except ExportError:
        shutil.rmtree(out)
        raise
    result.commands, result.notes = serve_lines(run_dir, loaded, out)
    return result


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
