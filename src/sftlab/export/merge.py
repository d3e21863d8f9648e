"""Merge a LoRA run into a full Hugging Face model, and prove the export computes what the run did."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sftlab.errors import SftlabError

CHECK_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 × 7."}],
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
]


class ExportError(SftlabError):
    pass


def merge(run_dir: str, output: str, atol: float = 1e-4) -> float:
    """Fold the adapter into the base weights, save, reload, and compare logits; returns the max diff."""
    from transformers import AutoModelForCausalLM

    from sftlab.model.methods import is_prompt_learning
    from sftlab.rundir import load_run

    loaded = load_run(run_dir)
    if not loaded.is_adapter:
        raise ExportError(f"{run_dir} holds a full model already (no adapter_config.json); nothing to merge")
    if not hasattr(loaded.model, "merge_and_unload"):
        raise ExportError(f"{run_dir}: bottleneck adapters add a nonlinearity (up(gelu(down(h)))) that no weight "
                          "matrix can absorb; they cannot be merged. Serve or generate with the run directory.")  # fmt: skip
    if is_prompt_learning(loaded.model):
        raise ExportError(f"{run_dir}: prefix/ptuning/prompt runs add virtual tokens, not weight deltas; they "
                          "cannot be merged into the base. Use the run directory with generate/chat/eval.")  # fmt: skip
    batch = _check_batch(loaded.tokenizer)
    expected = _logits(loaded.model, batch)  # the adapter applied on the fly, as in training
    merged = loaded.model.merge_and_unload()
    out = Path(output)
    merged.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    # generation_config.json: the run's stop tokens (its template's end of turn); the rest: provenance
    for extra in ("generation_config.json", "config.yaml", "data_report.json", "summary.json"):
        if (Path(run_dir) / extra).is_file():
            shutil.copy(Path(run_dir) / extra, out / extra)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = (expected - _logits(reloaded, batch)).abs().max().item()
    if not diff <= atol * max(1.0, expected.abs().max().item()):
        shutil.rmtree(out)
        raise ExportError(f"the merged export's logits differ from the adapter's by {diff:.3g}; export removed")
    return diff


def _check_batch(tokenizer) -> dict:
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in CHECK_PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    logits = model(**batch).logits.float()
    return logits * batch["attention_mask"][..., None]  # padded positions carry no meaning
