"""`sftlab export --format gguf|ollama`: the tuned model as one GGUF file, checked before it is kept.

Merged (or full) model -> a staging Hugging Face directory whose EOS is the template's end of turn
-> llama.cpp's converter (f32/f16/bf16/q8_0) and, for k-quants, llama.cpp's quantizer -> read back:
the metadata (architecture, training chat template, EOS) with gguf-py's reader, the weights with
transformers' GGUF loader and, where installed, llama.cpp itself; an export that does not answer like
the tuned model is deleted.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sftlab.export import check, llama_cpp
from sftlab.export.gguf_kv import read_metadata
from sftlab.export.merge import ExportError, merge

# Llama-shaped decoders: what llama.cpp's converter maps and transformers' GGUF loader reads back.
SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3"}  # fmt: skip
QUANTS = (*llama_cpp.CONVERTER_TYPES, *llama_cpp.QUANT_TYPES)


@dataclass
class GgufExport:
    path: Path
    quant: str
    size_bytes: int
    eos_token: str
    checks: list[check.Comparison] = field(default_factory=list)
    adapter: Path | None = None
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"file": self.path.name, "quant": self.quant, "size_bytes": self.size_bytes, "eos_token": self.eos_token,
                "adapter": self.adapter.name if self.adapter else None, "checks": [c.to_dict() for c in self.checks],
                "modelfile": self.modelfile.name if self.modelfile else None, "notes": self.notes}  # fmt: skip


def export_gguf(run_dir: str, output: str, quant: str = "q8_0", prompts: list[list[dict]] | None = None,
                adapter_only: bool = False, ollama: bool = False, max_new_tokens: int = 48,
                say=print) -> GgufExport:  # fmt: skip
    """Write `output`/<run>-<quant>.gguf (with `adapter_only`: the base's GGUF and <run>-lora-f16.gguf),
    check it against the tuned model, with `ollama` write a Modelfile beside it, and return what was
    written and measured."""
    from sftlab.rundir import load_run

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: not a GGUF type; choose one of {', '.join(QUANTS)}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_run(run_dir)
    _check_architecture(loaded.model, run_dir)
    if adapter_only and not loaded.is_adapter:
        raise ExportError(f"--adapter-only: {run_dir} holds a full model, not an adapter")
    name = Path(run_dir).resolve().name
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as tmp:
        staging = Path(tmp) / "hf"
        _stage(run_dir, loaded, staging, base_only=adapter_only)
        eos = _reply_end(loaded.tokenizer)
        _set_eos(staging, eos, loaded.tokenizer.convert_tokens_to_ids(eos))
        path = out / f"{name}{'-base' if adapter_only else ''}-{quant}.gguf"
        _write(staging, path, quant, Path(tmp))
        adapter = None
        if adapter_only:
            adapter = out / f"{name}-lora-f16.gguf"
            llama_cpp.convert_lora(Path(run_dir), staging, adapter)
    result = GgufExport(path, quant, path.stat().st_size, eos, adapter=adapter)
    try:
        _check_metadata(path, loaded.tokenizer, eos)
        if adapter is not None:
            _check_lora(adapter, Path(run_dir))
            if llama_cpp.have_llama_cpp():  # only llama.cpp applies a GGUF LoRA
                readers = [("llama.cpp base + LoRA", lambda stop: check.LlamaCppLM(path, stop, lora=adapter))]
                result.checks = check.against_tuned(loaded, readers, quant, prompts, max_new_tokens, say)
        else:
            result.checks = _check_answers(loaded, path, quant, prompts, max_new_tokens, say)
    except ExportError:
        path.unlink(missing_ok=True)
        if adapter is not None:
            adapter.unlink(missing_ok=True)
        raise
    if ollama:
        _write_modelfile(loaded, result, out)
    else:
        result.commands.append(f"llama-cli -m {path}" + (f" --lora {adapter}" if adapter else "") + " -cnv")
    (out / f"{path.stem}.export.json").write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    return result


def _write_modelfile(loaded, result: GgufExport, out: Path) -> None:
    from sftlab.data.templates import stop_ids
    from sftlab.export import ollama

    tok = loaded.tokenizer
    stops = tok.convert_ids_to_tokens(stop_ids(tok, tok.chat_template))
    data = loaded.cfg.data if loaded.cfg is not None else None
    text, note = ollama.modelfile(result.path.name, data.template if data else "auto", stops,
                                  data.system_prompt if data else None, bos_token=tok.bos_token or "",
                                  eos_token=tok.eos_token or "")  # fmt: skip
    if result.adapter is not None:  # FROM the base's GGUF, then the LoRA on top
        first, rest = text.split("\n", 1)
        text = f"{first}\nADAPTER ./{result.adapter.name}\n{rest}"
    result.modelfile = out / "Modelfile"
    result.modelfile.write_text(text)
    result.notes += [note] if note else []
    result.commands.append(ollama.create_command(result.path.stem.removesuffix(f"-{result.quant}"), result.modelfile))


def _check_architecture(model, run_dir: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    arch = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    if arch not in SUPPORTED:
        raise ExportError(f"{run_dir}: GGUF export supports {', '.join(SUPPORTED)} (Llama-shaped decoders), "
                          f"not {arch}; use `sftlab export --format hf` for other architectures")  # fmt: skip


def _stage(run_dir: str, loaded, staging: Path, base_only: bool) -> None:
    """A Hugging Face directory of the model to convert: merged, the run's full model, or (base_only) the base."""
    if base_only:  # the base as published (a QLoRA run's too: llama.cpp applies the LoRA to it)
        from transformers import AutoModelForCausalLM

        from sftlab.model.load import resolve_model_dir

        base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(loaded.base_name), dtype="auto")
        base.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
    elif loaded.is_adapter:
        merge(run_dir, str(staging))
    else:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)


def _reply_end(tokenizer) -> str:
    """The token the training template writes after a reply (ChatML's <|im_end|>, Llama 3's <|eot_id|>):
    llama.cpp and Ollama stop at EOS, so EOS must be it."""
    from sftlab.data.templates import stop_ids

    ids = stop_ids(tokenizer, tokenizer.chat_template)
    written = [i for i in ids if i != tokenizer.eos_token_id] or ids
    return tokenizer.convert_ids_to_tokens(written[0])


def _set_eos(staging: Path, token: str, token_id: int) -> None:
    """The converter reads EOS from tokenizer_config.json, then config.json: both say the end of turn."""
    for name, key, value in (("tokenizer_config.json", "eos_token", token), ("config.json", "eos_token_id", token_id)):
        data = json.loads((staging / name).read_text())
        data[key] = value
        (staging / name).write_text(json.dumps(data, indent=1, ensure_ascii=False))


def _write(staging: Path, path: Path, quant: str, tmp: Path) -> None:
    if quant in llama_cpp.CONVERTER_TYPES:
        llama_cpp.convert(staging, path, quant)
        return
    wide = tmp / "f16.gguf"  # k-quants start from 16-bit weights, as llama-quantize's docs do
    llama_cpp.convert(staging, wide, "f16")
    llama_cpp.quantize(wide, path, quant)


def _check_metadata(path: Path, tokenizer, eos: str) -> None:
    """The file says what training used: its template, its end of turn, its vocabulary."""
    meta = read_metadata(path)
    if meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        raise ExportError(f"{path}: the embedded tokenizer.chat_template is not the training template; export removed")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id != tokenizer.convert_tokens_to_ids(eos):
        raise ExportError(f"{path}: EOS is token {eos_id}, not the end of turn {eos!r}; export removed")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if len(tokens) < len(tokenizer):
        raise ExportError(f"{path}: the vocabulary has {len(tokens)} tokens, the tokenizer {len(tokenizer)}; "
                          "export removed")  # fmt: skip


def _check_lora(adapter: Path, run_dir: Path) -> None:
    """The GGUF LoRA holds the run's A and B matrices (each one's norm, names aside) and its alpha."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import load_file

    reader = GGUFReader(adapter)
    written = sorted(float(torch.from_numpy(t.data.astype("float32")).norm()) for t in reader.tensors)
    tensors = load_file(run_dir / "adapter_model.safetensors")
    trained = sorted(float(t.float().norm()) for name, t in tensors.items() if ".lora_" in name)
    alpha = reader.fields["adapter.lora.alpha"].contents() if "adapter.lora.alpha" in reader.fields else None
    want = json.loads((run_dir / "adapter_config.json").read_text()).get("lora_alpha")
    same = len(written) == len(trained) and all(abs(a - b) <= 1e-3 * max(b, 1e-6) for a, b in zip(written, trained))
    if not same or alpha is None or abs(alpha - float(want)) > 1e-6:
        raise ExportError(f"{adapter}: the GGUF LoRA does not hold the run's adapter ({len(written)} tensors for "
                          f"{len(trained)}, alpha {alpha} for {want}); export removed")  # fmt: skip


def _check_answers(loaded, path: Path, quant: str, prompts, max_new: int, say) -> list[check.Comparison]:
    """transformers' GGUF loader and, where installed, llama.cpp, each against the tuned model."""
    import torch
    from transformers import AutoModelForCausalLM

    def transformers_reader(stop):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

    readers = [("transformers GGUF loader", transformers_reader)]
    if llama_cpp.have_llama_cpp():
        readers.append(("llama.cpp", lambda stop: check.LlamaCppLM(path, stop)))
    return check.against_tuned(loaded, readers, quant, prompts, max_new, say)
