"""The task protocol: what differs between fine-tuning a chat LM, a classifier and a translator.

The loop, optimizer, schedule, checkpoints and resume (sftlab.loop) are the same for every task;
a task supplies data -> tensors, the model, the summed loss and the count that normalizes it,
eval metrics and extra files. `causal_lm`, `classification` and `seq2seq` are the three.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from sftlab.config import DataConfig
from sftlab.data.dataset import hold_out
from sftlab.data.formats import load_field_records
from sftlab.data.tokenize import DatasetReport
from sftlab.errors import DataError
from sftlab.metrics.perplexity import eval_loss


class Task(Protocol):
    name: str
    causal_decoder: bool  # a decoder LM: sftlab's attention, RMSNorm, flat batches and bf16 masters apply
    final_eval_file: bool  # the final model's eval/metrics.json is written when training ends

    def load_data(self, tokenizer, seed: int) -> tuple:
        """(train, eval or None, {split: [DatasetReport]}): tokenized datasets and what happened to each."""

    def load_model(self, precision: str, tokenizer) -> torch.nn.Module: ...

    def loss_module(self, lm: torch.nn.Module) -> torch.nn.Module:
        """The model and its loss as one module: forward(**batch) returns the *sum* over supervised units."""

    def collate(self, pad_id: int, layout: str = "padded") -> Callable[[list[dict]], dict]:
        """rows -> model inputs in `layout` (padded | packed | flat; only causal_lm takes the last two)."""

    def count(self, batch: dict) -> int | float:
        """The supervised units of a batch: the loss's normalizer (tokens, or examples for classification;
        their summed loss weights where the batch carries "loss_weights")."""

    def row_tokens(self, row: dict) -> int: ...

    def metrics(self, model, tokenizer, eval_data, out=None) -> dict:
        """Task metrics on the eval set ({} when there are none); files (confusion, translations) under `out`."""

    def chat_template(self, tokenizer) -> str | None:
        """The chat template trained with, saved beside the model (None: the task has none)."""

    def save_extras(self, out, tokenizer, model) -> None:
        """Files beside the saved model that inference needs (labels, the generation config's stop tokens)."""


def score_eval(task: Task, loss_module, lm, tokenizer, data, batch_size: int, out, accelerator=None) -> dict:
    """Eval loss (token- or example-weighted, every rank's share) and the task's metrics on rank 0,
    its files (confusion matrix, translations) under `out`."""
    pad = tokenizer.pad_token_id
    record = eval_loss(loss_module, data, batch_size, pad, accelerator, collate_fn=task.collate(pad), count_fn=task.count)
    if accelerator is None or accelerator.is_main_process:
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            record |= task.metrics(lm, tokenizer, data, out)
    return record


def load_record_splits(data: DataConfig, fields: tuple[str, ...], optional: tuple[str, ...], fmt: str, seed: int,
                       encode, fit=None):  # fmt: skip
    """Flat-record datasets (classification, seq2seq) -> (train, eval or None, {split: reports}), split as
    chat data is: data.eval, else a seeded data.eval_split of the encoded train set.

    fit(records) sees the training records before encoding (the class list); encode(rows, reports) returns
    the columns, where rows are (origin, record) pairs and record["_report"] indexes its dataset's report."""
    import datasets

    if not data.train:
        raise DataError("data.train lists no datasets; add one: data.train: [{path: file.jsonl}]")
    splits = {"train": _read_specs(data.train, fields, optional, fmt, data.on_bad_record)}
    if data.eval:
        splits["eval"] = _read_specs(data.eval, fields, optional, fmt, data.on_bad_record)
    if fit is not None:
        fit([r for _, r in splits["train"][0]])
    encoded = {}
    for split, (rows, reports) in splits.items():
        encoded[split] = datasets.Dataset.from_dict(encode(rows, reports))
        if len(encoded[split]) == 0:
            raise DataError(f"data.{split}: no examples left after the length policy; see the report")
    train, held = encoded["train"], encoded.get("eval")
    if held is None and data.eval_split > 0:
        train, held = hold_out(train, data.eval_split, seed)
    return train, held, {split: reports for split, (_, reports) in splits.items()}


def _read_specs(specs, fields, optional, fmt, on_bad_record):
    rows, reports = [], []
    for spec in specs:
        if spec.hf:
            raise DataError(f"hf: {spec.hf}: classification and seq2seq runs read local files (.jsonl, .csv, "
                            "...); export the dataset to a file, or train a chat (causal_lm) run from it")  # fmt: skip
        loaded = load_field_records(spec.path, fields, optional, spec.columns, on_bad_record)
        report = DatasetReport(name=spec.label, format=fmt, read=loaded.read)
        report.dropped.update({f"bad record: {k}": n for k, n in loaded.skipped.items()})
        rows += [(origin, {**r, "_report": len(reports)}) for origin, r in loaded.records]
        reports.append(report)
    return rows, reports
