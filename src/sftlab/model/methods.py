"""`train.method`: how a base model becomes the thing that trains, one function per family.

    full      every weight                       freeze   the last N layers and/or named modules
    lora      LoRA (DoRA, rsLoRA, PiSSA/OLoRA init)  qlora  LoRA on a 4-bit NF4 base (bitsandbytes)
    adalora   LoRA with an adaptive rank budget  ia3      learned rescaling vectors
    prefix    prefix tuning (P-tuning v2)        ptuning  P-tuning (prompt encoder)
    prompt    prompt tuning                      adapter  Houlsby bottleneck adapters

PEFT methods come from peft; bottleneck adapters are a small module here (peft has none, and the
adapters library pins older transformers). Everything else (loop, loss, outputs) is shared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sftlab.errors import ModelError

# peft's task_type for each sftlab task (SEQ_CLS also trains and saves the new head)
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
ADAPTER_FILE, ADAPTER_CONFIG = "bottleneck_adapters.safetensors", "bottleneck_config.json"


def wrap(model, cfg, total_steps: int):
    """The trainable model for cfg.train.method; afterwards only the method's parameters require grad."""
    method = cfg.train.method
    if method == "full":
        return model
    if method == "freeze":
        return freeze(model, cfg.peft.freeze_layers, cfg.peft.freeze_modules)
    if method == "adapter":
        return add_bottleneck_adapters(model, cfg.peft.adapter_size)
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(cfg, total_steps))
    except (ValueError, TypeError) as e:  # peft names the module or setting it could not use
        raise ModelError(f"train.method={method}: {e}") from None


def peft_config(cfg, total_steps: int):
    import peft

    method, lora, p = cfg.train.method, cfg.lora, cfg.peft
    common = {"task_type": PEFT_TASK_TYPES[cfg.task]}
    if method in ("lora", "qlora"):
        init = {"default": True}.get(lora.init, lora.init)
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
                               use_dora=lora.use_dora, use_rslora=lora.use_rslora, init_lora_weights=init,
                               **common)  # fmt: skip
    if method == "adalora":
        # The rank budget schedule is in steps: warm-up (tinit), pruning, then a final phase (tfinal).
        tinit, tfinal = int(p.adalora_tinit * total_steps), int(p.adalora_tfinal * total_steps)
        if tinit + tfinal >= total_steps:
            raise ModelError(f"adalora: peft.adalora_tinit + adalora_tfinal leave no steps to prune ranks in "
                             f"{total_steps} steps; lower them or train longer")  # fmt: skip
        return peft.AdaLoraConfig(init_r=p.adalora_init_r, target_r=p.adalora_target_r, tinit=tinit, tfinal=tfinal,
                                  deltaT=p.adalora_delta_t, total_step=total_steps, lora_alpha=lora.alpha,
                                  lora_dropout=lora.dropout, target_modules=lora.target_modules,
                                  orth_reg_weight=p.adalora_orth_reg, **common)  # fmt: skip
    if method == "ia3":
        return peft.IA3Config(**common)  # peft's per-architecture targets (k, v and the MLP's down projection)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, prefix_projection=p.prefix_projection,
                                       encoder_hidden_size=p.encoder_hidden_size, **common)  # fmt: skip
    if method == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=p.num_virtual_tokens,
                                        encoder_hidden_size=p.encoder_hidden_size, **common)  # fmt: skip
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, **common)
    raise ModelError(f"unknown train.method {method!r}")


def quantization_config():
    """QLoRA's base: NF4 weights with double quantization, bf16 compute."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError("train.method=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                         "(or use train.method=lora)") from None  # fmt: skip
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def is_prompt_learning(model) -> bool:
    config = getattr(model, "peft_config", None)
    return bool(config) and any(c.is_prompt_learning for c in config.values())


# --------------------------------------------------------------------------- freeze


def freeze(model, layers: int, modules: list[str]):
    """Train only the last `layers` decoder layers and the modules named in `modules` (name prefixes)."""
    blocks = _decoder_layers(model)
    if layers > len(blocks):
        raise ModelError(f"peft.freeze_layers={layers} but the model has {len(blocks)} layers")
    for p in model.parameters():
        p.requires_grad = False
    for block in blocks[len(blocks) - layers :] if layers else []:
        for p in block.parameters():
            p.requires_grad = True
    names = dict(model.named_modules())
    for wanted in modules:
        found = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if not found:
            raise ModelError(f"peft.freeze_modules: no module named {wanted!r} (e.g. {', '.join(list(names)[1:6])})")
        for n in found:
            for p in names[n].parameters():
                p.requires_grad = True
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("train.method=freeze trains nothing: set peft.freeze_layers > 0 or peft.freeze_modules")
    return model


def _decoder_layers(model) -> torch.nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ModelError("this architecture's decoder layers were not found; use train.method=lora")
    return layers


# --------------------------------------------------------------------------- bottleneck adapters


class Bottleneck(torch.nn.Module):
    """Houlsby adapter after a sublayer: h + up(gelu(down(h))), `up` zero-initialised so it starts as identity."""

    def __init__(self, inner: torch.nn.Linear, size: int):
        super().__init__()
        self.inner = inner
        width = inner.out_features
        self.down = torch.nn.Linear(width, size, dtype=torch.float32)
        self.up = torch.nn.Linear(size, width, dtype=torch.float32)
        torch.nn.init.normal_(self.down.weight, std=1e-2)
        torch.nn.init.zeros_(self.down.bias)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return h + self.up(torch.nn.functional.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def add_bottleneck_adapters(model, size: int):
    """Two adapters per layer, as Houlsby et al.: after attention's output projection and after the MLP."""
    for p in model.parameters():
        p.requires_grad = False
    wrapped = 0
    for block in _decoder_layers(model):
        for parent_name, child in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            parent = getattr(block, parent_name, None)
            inner = getattr(parent, child, None)
            if not isinstance(inner, torch.nn.Linear):
                raise ModelError("train.method=adapter supports decoders with self_attn.o_proj and mlp.down_proj "
                                 "(Llama, Qwen, Mistral, Gemma, ...); use train.method=lora")  # fmt: skip
            adapter = Bottleneck(inner, size).to(inner.weight.device)
            setattr(parent, child, adapter)
            wrapped += 1
    model.config.sftlab_bottleneck = {"size": size, "wrapped": wrapped}
    return model


def save_trained(model, out: Path, whole: dict | None = None) -> None:
    """The trained model as its method saves it: bottleneck adapters, a peft adapter or a full model.
    `whole`: the state dict gathered from FSDP/DeepSpeed shards, when an engine shards the model."""
    if getattr(model.config, "sftlab_bottleneck", None):
        save_bottleneck(model, out)
    else:
        model.save_pretrained(out, safe_serialization=True, **({"state_dict": whole} if whole else {}))


def save_bottleneck(model, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if _is_adapter_key(k)}
    save_file(state, out / ADAPTER_FILE)
    base = getattr(model, "sftlab_base", None) or model.config.name_or_path
    (out / ADAPTER_CONFIG).write_text(json.dumps({"size": model.config.sftlab_bottleneck["size"], "base": base}))


def load_bottleneck(model, path: Path):
    from safetensors.torch import load_file

    config = json.loads((path / ADAPTER_CONFIG).read_text())
    model = add_bottleneck_adapters(model, config["size"])
    missing = model.load_state_dict(load_file(path / ADAPTER_FILE), strict=False)
    if missing.unexpected_keys or any(_is_adapter_key(k) for k in missing.missing_keys):
        raise ModelError(f"{path}: the adapter weights do not fit this base model")
    return model


def _is_adapter_key(key: str) -> bool:
    return ".down." in key or ".up." in key or key.endswith((".down.weight", ".up.weight"))


def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(length*dim) on input embeddings,
    in training mode only, so evaluation and generation see the clean embeddings."""

    def hook(module, inputs, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return hook


# --------------------------------------------------------------------------- what a method adds to the step


class StepHooks:
    """What a method adds to the optimizer step beyond its forward; most methods add nothing."""

    def penalty(self, model) -> torch.Tensor | None:
        """A term added to the objective of the step's last micro-batch (once a step, on every rank)."""
        return None

    def after_step(self, model, step: int) -> None:
        """Called after the optimizer step, before gradients are zeroed."""

    def state(self, model) -> dict | None:
        """What a resumed run needs beyond weights and optimizer (saved in the checkpoint)."""
        return None

    def load_state(self, model, state: dict | None) -> None:
        pass


class AdaLoraHooks(StepHooks):
    """AdaLoRA: its orthogonality penalty (peft adds it only inside its own forward's loss), rank
    pruning on the run's real step count (peft: after the step, before zero_grad), and its importance
    averages and rank pattern in checkpoints, so resume is exact."""

    def penalty(self, model) -> torch.Tensor | None:
        config = next(iter(model.peft_config.values()))
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return config.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def after_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state(self, model) -> dict | None:
        allocator = model.base_model.rankallocator
        config = next(iter(model.peft_config.values()))
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": config.rank_pattern}  # fmt: skip

    def load_state(self, model, state: dict | None) -> None:
        if state is None:
            return
        allocator = model.base_model.rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        next(iter(model.peft_config.values())).rank_pattern = state["rank_pattern"]


def step_hooks(method: str) -> StepHooks:
    return AdaLoraHooks() if method == "adalora" else StepHooks()
