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
        from sftlab.model.load import load_base_for

        return load_base_for(self.cfg, precision)

    def loss_module(self, lm) -> torch.nn.Module:
        from sftlab.model.loss import SupervisedLoss

        return SupervisedLoss(lm, self.cfg.train.loss_chunk_tokens)

    def collate(self, pad_id: int, layout: str = "padded"):
        from functools import partial

        from sftlab.data.batching import collate, collate_packed

        if layout == "packed":
            return partial(collate_packed, max_length=self.cfg.data.max_length, pad_id=pad_id)
        if layout == "flat":
            return partial(collate_packed, max_length=None, pad_id=pad_id)
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


def load_record_splits(data, fields: tuple[str, ...], optional: tuple[str, ...], fmt: str, seed: int, encode,
                       fit=None):  # fmt: skip
    """Flat-record datasets (classification, seq2seq) -> (train, eval or None, {split: reports}), split as
    load_train_eval splits chat data: data.eval, else a seeded data.eval_split of the encoded train set.

    fit(records) sees the training records before encoding (the class list); encode(rows, reports) returns
    the columns, where rows are (origin, record) pairs and record["_report"] indexes its dataset's report."""
    import datasets

    from sftlab.errors import DataError

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
    if "eval" not in encoded and data.eval_split > 0:
        if len(encoded["train"]) < 2:
            raise DataError("data.eval_split needs at least 2 training examples")
        parts = encoded["train"].train_test_split(test_size=data.eval_split, seed=seed)
        encoded = {"train": parts["train"], "eval": parts["test"]}
    return encoded["train"], encoded.get("eval"), {split: reports for split, (_, reports) in splits.items()}


def _read_specs(specs, fields, optional, fmt, on_bad_record):
    from sftlab.data.formats import load_field_records
    from sftlab.data.tokenize import DatasetReport

    rows, reports = [], []
    for spec in specs:
        loaded = load_field_records(spec.path, fields, optional, spec.columns, on_bad_record)
        report = DatasetReport(name=spec.label, format=fmt, read=loaded.read)
        report.dropped.update({f"bad record: {k}": n for k, n in loaded.skipped.items()})
        rows += [(origin, {**r, "_report": len(reports)}) for origin, r in loaded.records]
        reports.append(report)
    return rows, reports


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
    from sftlab.model.load import load_model

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


def evaluate_run(run_dir: str, overrides: list[str] = (), output: str | None = None) -> dict:
    """`sftlab eval` for a classification or seq2seq run: eval loss and the task's metrics on data.eval
    (overrides may point it at other data), written as OUTPUT/metrics.json in `sftlab eval`'s layout."""
    from pathlib import Path

    from sftlab.config import load_config
    from sftlab.errors import DataError

    cfg = load_config(Path(run_dir) / "config.yaml", list(overrides))
    model, tokenizer, _ = load_trained(run_dir, cfg.task)
    task = get_task(cfg)
    if cfg.task == "classification":  # the run's class order, whatever the data holds
        from sftlab.task.classification import load_labels

        task.labels = load_labels(Path(run_dir))[0]
    _, eval_data, _ = task.load_data(tokenizer, cfg.train.seed)
    if eval_data is None:
        raise DataError(f"{run_dir}: the run has no eval data; name some: sftlab eval {run_dir} data.eval=[FILE]")
    out = Path(output) if output else Path(run_dir) / "eval"
    metrics = evaluate(task, task.loss_module(model), model, tokenizer, eval_data, cfg.train.batch_size, out)
    write_eval(out, str(run_dir), metrics)
    return metrics


def evaluate(task, loss_module, lm, tokenizer, data, batch_size: int, out, accelerator=None) -> dict:
    """Eval loss (token- or example-weighted, every rank's share) and the task's metrics on rank 0,
    its files (confusion matrix, translations) under `out`."""
    from sftlab.metrics.perplexity import eval_loss

    pad = tokenizer.pad_token_id
    record = eval_loss(loss_module, data, batch_size, pad, accelerator,
                       collate_fn=task.collate(pad), count_fn=task.count)  # fmt: skip
    if accelerator is None or accelerator.is_main_process:
        import contextlib

        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            record |= task.metrics(lm, tokenizer, data, out)
    return record


def write_eval(out, source: str, metrics: dict) -> None:
    """OUT/metrics.json in `sftlab eval`'s layout, so the report shows classification and seq2seq runs too."""
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "models": {"model": {"source": source, "metrics": metrics}}, "delta": {}}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
