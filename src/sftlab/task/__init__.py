"""`task:` what is fine-tuned: a chat causal LM, a classifier, or a seq2seq translator.

A task supplies what differs between them (data -> tensors, the model class, the summed loss, the
supervised-unit count that normalizes it, eval metrics, extra files); the loop, optimizer, schedule,
checkpoints and resume in train.py are the same for all three.
"""

from __future__ import annotations

import torch

from sftlab.config import Config

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


class CausalLM:
    """Chat SFT: conversations rendered with a chat template, loss on the assistant tokens."""

    name = "causal_lm"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load_data(self, tokenizer, seed: int):
        from sftlab.data.dataset import load_train_eval

        return load_train_eval(self.cfg.data, tokenizer, seed)

    def load_model(self, precision: str, tokenizer):
        from sftlab.models import load_base_for

        return load_base_for(self.cfg, precision)

    def loss_module(self, lm) -> torch.nn.Module:
        from sftlab.loss import SupervisedLoss

        return SupervisedLoss(lm, self.cfg.train.loss_chunk_tokens)

    def collate(self, pad_id: int, packing: bool = False):
        from functools import partial

        from sftlab.data.batching import collate, collate_packed

        if packing:
            return partial(collate_packed, max_length=self.cfg.data.max_length, pad_id=pad_id)
        return partial(collate, pad_id=pad_id)

    def count(self, batch: dict) -> int:
        from sftlab.data.batching import supervised_count

        return supervised_count(batch)

    def row_tokens(self, row: dict) -> int:
        return len(row["input_ids"])

    def metrics(self, model, tokenizer, eval_data, out=None) -> dict:
        return {}  # generation metrics run through `sftlab eval` and eval.generate_every

    def save_extras(self, out, tokenizer) -> None:
        pass


def get_task(cfg: Config):
    if cfg.task == "classification":
        from sftlab.task.classification import Classification

        return Classification(cfg)
    if cfg.task == "seq2seq":
        from sftlab.task.seq2seq import Seq2Seq

        return Seq2Seq(cfg)
    return CausalLM(cfg)


def split_eval(train: list, eval_: list | None, fraction: float, seed: int) -> tuple[list, list | None]:
    """data.eval when given, else a seeded held-out fraction of train, else no eval."""
    import random

    if eval_ is not None or fraction <= 0:
        return train, eval_
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(train))))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(train) if i not in held], [x for i, x in enumerate(train) if i in held]


def pad_rows(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def load_trained(run_dir: str, task: str):
    """(model in eval mode, tokenizer, run config) of a finished classification or seq2seq run."""
    from pathlib import Path

    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    from sftlab.config import load_config
    from sftlab.errors import ModelError
    from sftlab.models import load_model

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    if cfg.task != task:
        raise ModelError(f"{run} is a {cfg.task} run, not {task}")
    auto_cls, extra = AutoModelForSeq2SeqLM, {}
    if task == "classification":
        from sftlab.task.classification import label_kwargs, load_labels

        auto_cls, extra = AutoModelForSequenceClassification, label_kwargs(load_labels(run)[0])
    if (run / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(cfg.model, auto_cls=auto_cls, **extra), str(run))
    elif (run / "config.json").is_file():
        model = auto_cls.from_pretrained(run)
    else:
        raise ModelError(f"{run}: no model saved (the run did not finish); finish it with `sftlab train --resume`")
    return model.eval(), AutoTokenizer.from_pretrained(run), cfg
