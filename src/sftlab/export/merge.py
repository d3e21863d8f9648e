"""Merge a LoRA run into a full Hugging Face model, and prove the export computes what the run did.

A qlora run trained its adapter over a 4-bit NF4 base. By default (into="nf4") the adapter is folded
into that base's dequantized weights, the model the run trained and evaluated; into="full-precision"
folds it into the original full-precision base instead, a model the run never computed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sftlab.errors import SftlabError
from sftlab.model.load import load_weights

CHECK_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 × 7."}],
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
]

INTO = ("nf4", "full-precision")
# The logits check: max |export - adapter| <= atol * max(1, max |adapter logit|).
EXACT_ATOL = 1e-4  # an fp32 adapter folded into fp32 weights: float rounding only
# The NF4 fold is checked against the 4-bit model as it runs, which computes in bf16 (bitsandbytes'
# compute dtype; its embeddings, norms and lm_head are bf16 too), while the export computes the same
# weights in fp32: bf16's rounding of activations is what remains, and it is large. Measured on the
# quickstart qlora run (SmolLM2-135M, max |logit| 38.5): the NF4 export is 1.36 (3.5e-2 of the peak)
# from the 4-bit model; the 4-bit model's own two CPU kernels (bitsandbytes' eval and training paths)
# disagree by 2.2 (5.7e-2), the dequantized model in bf16 vs fp32 by 1.8; folding into the
# full-precision base instead is 25.4 (0.66) away. 0.1 is about twice bf16's own kernel-to-kernel
# spread and well below a wrong base.
NF4_ATOL = 0.1


class ExportError(SftlabError):
    pass


def merge(run_dir: str, output: str, atol: float | None = None, into: str | None = None) -> float:
    """Fold the adapter into the base weights, save, reload, and compare logits; returns the max diff.

    into: what a qlora run's adapter is folded into: "nf4" (the dequantized 4-bit weights it trained
    on; checked against the 4-bit model as it runs) or "full-precision" (the original base; checked
    against the adapter applied to that base). None: as trained, i.e. "nf4" for a qlora run and the
    full-precision base for every other run, which has no NF4 weights ("nf4" is refused there).
    atol: the check's tolerance relative to the largest logit; None: NF4_ATOL for an NF4 fold, else EXACT_ATOL."""
    from transformers import AutoModelForCausalLM

    from sftlab.model.methods import is_prompt_learning
    from sftlab.rundir import load_run

    qlora = _is_qlora_run(Path(run_dir))
    into = _resolve_into(run_dir, into, qlora)
    loaded = load_run(run_dir, full_precision_base=into == "full-precision")
    if not loaded.is_adapter:
        raise ExportError(f"{run_dir} holds a full model already (no adapter_config.json); nothing to merge")
    if not hasattr(loaded.model, "merge_and_unload"):
        raise ExportError(f"{run_dir}: bottleneck adapters add a nonlinearity (up(gelu(down(h)))) that no weight "
                          "matrix can absorb; they cannot be merged. Serve or generate with the run directory.")  # fmt: skip
    if is_prompt_learning(loaded.model):
        raise ExportError(f"{run_dir}: prefix/ptuning/prompt runs add virtual tokens, not weight deltas; they "
                          "cannot be merged into the base. Use the run directory with generate/chat/eval.")  # fmt: skip
    tokenizer = loaded.tokenizer
    batch = _check_batch(tokenizer)
    if into == "nf4":
        # Dequantize before the 4-bit model's first forward: on CPU bitsandbytes repacks its weights then.
        to_merge = _on_dequantized_base(loaded, run_dir)
        atol = NF4_ATOL if atol is None else atol
    else:
        to_merge = loaded.model
        atol = EXACT_ATOL if atol is None else atol
    expected = _logits(loaded.model, batch)  # the adapter applied on the fly, as in training
    merged = to_merge.merge_and_unload()
    del loaded, to_merge
    out = Path(output)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_run_files(run_dir, out)
    del merged
    reloaded = load_weights(AutoModelForCausalLM, out, dtype=torch.float32).eval()
    diff = (expected - _logits(reloaded, batch)).abs().max().item()
    if not diff <= atol * max(1.0, expected.abs().max().item()):
        shutil.rmtree(out)
        raise ExportError(f"the merged export's logits differ from the adapter's by {diff:.3g}; export removed")
    return diff


def copy_run_files(run_dir: str, out: Path) -> None:
    """generation_config.json (the run's stop tokens: its template's end of turn) and the run's provenance."""
    for extra in ("generation_config.json", "config.yaml", "data_report.json", "summary.json"):
        if (Path(run_dir) / extra).is_file():
            shutil.copy(Path(run_dir) / extra, out / extra)


def _is_qlora_run(path: Path) -> bool:
    from sftlab import rundir
    from sftlab.model.load import trains_on_4bit

    return rundir.is_run(path) and rundir.model_kind(path) == "peft" and trains_on_4bit(rundir.read_config(path))


def _resolve_into(run_dir: str, into: str | None, qlora: bool) -> str:
    if into is not None and into not in INTO:
        raise ExportError(f"into={into!r}: choose one of {', '.join(INTO)}")
    if into == "nf4" and not qlora:
        raise ExportError(f"{run_dir} is not a qlora run (of a causal LM): its base has no NF4 weights to merge "
                          "into; leave the choice out to merge into the base it trained on")  # fmt: skip
    return into or ("nf4" if qlora else "full-precision")


def _on_dequantized_base(loaded, run_dir: str):
    """The run's adapter on a full-precision copy of the 4-bit base it trained on: every bitsandbytes
    Linear4bit weight dequantized (bitsandbytes.functional.dequantize_4bit) to fp32, every other weight
    (embeddings, norms, lm_head: bf16 in the 4-bit model) upcast to fp32, so the copy holds exactly the
    weights the 4-bit model computes with."""
    from peft import PeftModel

    from sftlab.model.load import load_model

    weights = _dequantized_weights(loaded.model.get_base_model())
    plain = load_model(loaded.cfg.model)  # the architecture and config in fp32; its weights are replaced
    params = dict(plain.named_parameters())
    missing, unknown = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unknown:
        raise ExportError(f"{run_dir}: the 4-bit base's weights do not map onto the full-precision model "
                          f"(missing {missing[:3]}, unknown {unknown[:3]})")  # fmt: skip
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != weights[name].shape:
                raise ExportError(f"{run_dir}: {name} is {tuple(weights[name].shape)} in the 4-bit base, "
                                  f"{tuple(p.shape)} in the full-precision model")  # fmt: skip
            p.copy_(weights[name])
    return PeftModel.from_pretrained(plain, run_dir).eval()


def _dequantized_weights(quantized) -> dict[str, torch.Tensor]:
    """{parameter name in the plain model: fp32 tensor} of a peft-wrapped 4-bit model's base weights."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    weights = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                raise ExportError("internal: the 4-bit weights were repacked for CPU inference before dequantizing")
            weights[_plain_name(name) + ".weight"] = dequantize_4bit(w.data, w.quant_state).float().cpu()
    for name, p in quantized.named_parameters():
        if hasattr(p, "quant_state") or "lora_" in name or ".modules_to_save." in name:
            continue  # the quantized weights (done above); the adapter's own, which the merge folds in
        weights[_plain_name(name)] = p.detach().float().cpu()
    return weights


def _plain_name(name: str) -> str:
    """A name in the peft-wrapped model -> the same weight's name in the plain model."""
    return name.replace(".base_layer", "").replace(".original_module", "")


def _check_batch(tokenizer) -> dict:
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in CHECK_PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device  # a 4-bit base on a GPU machine loads onto the GPU
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return logits * batch["attention_mask"][..., None]  # padded positions carry no meaning
