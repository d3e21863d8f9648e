"""task: causal_lm. Chat SFT: conversations rendered with a chat template, loss on the assistant tokens."""

from __future__ import annotations

from functools import partial

import torch

from sftlab.config import Config
from sftlab.data.batching import collate, collate_packed, supervised_count, supervised_weight
from sftlab.data.dataset import load_train_eval
from sftlab.data.templates import ChatTemplate, stop_ids
from sftlab.model.load import load_base_for, save_generation_config
from sftlab.model.loss import SupervisedLoss


class CausalLM:
    name = "causal_lm"
    causal_decoder = True
    final_eval_file = False  # `sftlab eval` writes eval/ for chat runs (generation metrics, benchmarks)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load_data(self, tokenizer, seed: int):
        return load_train_eval(self.cfg.data, tokenizer, seed)

    def load_model(self, precision: str, tokenizer, shape_only: bool = False):
        """The base as the method needs it; shape_only: on the meta device, no weights read (fsdp's ranks
        after the first, which receive their shards from rank 0)."""
        if shape_only:
            from sftlab.model.load import frozen_dtype, load_shape

            return load_shape(self.cfg.model, frozen_dtype(self.cfg.train.method, precision))
        return load_base_for(self.cfg, precision)

    def loss_module(self, lm) -> torch.nn.Module:
        return SupervisedLoss(lm, self.cfg.train.loss_chunk_tokens)

    def collate(self, pad_id: int, layout: str = "padded"):
        if layout == "packed":
            return partial(collate_packed, max_length=self.cfg.data.max_length, pad_id=pad_id)
        if layout == "flat":
            return partial(collate_packed, max_length=None, pad_id=pad_id)
        return partial(collate, pad_id=pad_id)

    def count(self, batch: dict) -> int | float:
        # Weighted examples: the normalizer is the tokens' summed weights (docs/correctness.md rule 3).
        return supervised_weight(batch) if "loss_weights" in batch else supervised_count(batch)

    def row_tokens(self, row: dict) -> int:
        return len(row["input_ids"])

    def metrics(self, model, tokenizer, eval_data, out=None) -> dict:
        return {}  # generation metrics run through `sftlab eval` and eval.generate_every

    def chat_template(self, tokenizer) -> str | None:
        return ChatTemplate(tokenizer, self.cfg.data.template, self.cfg.data.template_kwargs).source

    def save_extras(self, out, tokenizer, model) -> None:
        # transformers, vLLM and llama.cpp stop at the generation config's EOS ids: list the template's
        # end-of-turn tokens there too, or a model whose EOS differs from them generates past its turn.
        save_generation_config(model, out, stop_ids(tokenizer, self.chat_template(tokenizer)))
