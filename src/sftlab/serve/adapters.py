"""What a server serves: one base model, optionally with LoRA adapters selected by model id."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from sftlab import rundir
from sftlab.errors import ModelError


@dataclass
class Served:
    model: object  # a causal LM, or a PeftModel holding every adapter
    tokenizer: object
    templates: dict[str, str | None]  # model id -> chat template (None: the tokenizer's)
    adapters: dict[str, str | None]  # model id -> adapter name (None: the base weights)
    context_length: int
    eos_ids: set[int]

    @property
    def ids(self) -> list[str]:
        return list(self.adapters)

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the embedding's rows (some models pad them past the tokenizer)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @contextlib.contextmanager
    def select(self, model_id: str):
        """The model with `model_id`'s adapter active (or every adapter off for the base)."""
        adapter = self.adapters[model_id]
        if adapter is None and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
            return
        if adapter is not None:
            self.model.set_adapter(adapter)
        yield self.model


def load_served(source: str, adapters: list[str] = (), precision: str = "fp32") -> Served:
    """`source` as `sftlab generate` takes it; each of `adapters` is RUN_DIR or NAME=RUN_DIR of a LoRA run.

    precision: fp32 | bf16 | fp16 | auto: the GPU's half type, fp32 on CPU (on CPU bf16 decoding is no
    faster, and slower with unmerged LoRA adapters; benchmarks/RESULTS.md)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from sftlab.data.templates import end_of_turn_ids
    from sftlab.model.methods import is_prompt_learning
    from sftlab.rundir import load_run

    loaded = load_run(source)
    model, tok = loaded.model, loaded.tokenizer
    if is_prompt_learning(model):
        raise ModelError(f"{source}: prefix/ptuning/prompt runs are not served (their virtual tokens need peft's own "
                         "generate); use `sftlab chat` or `sftlab generate` with this run")  # fmt: skip
    ids: dict[str, str | None] = {}
    templates: dict[str, str | None] = {}
    if loaded.is_adapter and not isinstance(model, PeftModel):  # bottleneck adapters: only the tuned model
        ids[_model_id(source)] = None
    elif loaded.is_adapter:
        name = _model_id(source)
        ids[_model_id(loaded.base_name)] = None
        ids[name] = "default"  # the adapter PeftModel.from_pretrained loaded
        templates[name] = tok.chat_template
    else:
        ids[loaded.base_name if loaded.base_name != source else _model_id(source)] = None
    for spec in adapters:
        name, _, path = spec.rpartition("=")
        name = name or _model_id(path)
        if rundir.model_kind(Path(path)) != "peft":
            raise ModelError(f"--adapter {spec}: {path} is not a LoRA run (no {rundir.PEFT_CONFIG})")
        if name in ids:
            raise ModelError(f"--adapter {spec}: the model id {name!r} is already served; name it: --adapter NAME={path}")
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        model.eval()
        ids[name] = name
        templates[name] = AutoTokenizer.from_pretrained(path).chat_template
    import torch

    from sftlab.model.load import is_4bit
    from sftlab.model.precision import dtype_of, resolve_precision

    if precision == "auto" and not torch.cuda.is_available():
        precision = "fp32"
    dtype = dtype_of(resolve_precision(precision))
    if torch.cuda.is_available():
        model = model.cuda()
    model = (model if is_4bit(model) else model.to(dtype)).eval()  # a qlora run: the dtypes it trained in
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return Served(model, tok, templates, ids, int(context), end_of_turn_ids(tok))


def _model_id(source: str) -> str:
    path = Path(source)
    return path.resolve().name if path.exists() else source
