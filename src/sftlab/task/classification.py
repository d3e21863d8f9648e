"""task: classification. Records {text[, text_pair], label} -> a sequence-classification head on an
encoder (BERT family) or a decoder backbone; loss = (class-weighted) cross-entropy summed over
examples, divided once per optimizer step by the step's examples, like the token loss of chat SFT."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sftlab.config import Config
from sftlab.data.batching import pad
from sftlab.data.formats import load_field_records
from sftlab.data.tokenize import DROP_TOO_LONG, DatasetReport, length_outcome
from sftlab.errors import DataError
from sftlab.rundir import LABELS_FILE, load_labels, load_run
from sftlab.task.base import load_record_splits


class Classification:
    name = "classification"
    causal_decoder = False
    final_eval_file = True

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.labels: list[str] = list(cfg.classification.labels)
        self.label_type = "str"
        self.weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ data

    def load_data(self, tokenizer, seed: int):
        train, eval_, reports = load_record_splits(
            self.cfg.data, ("text", "label"), ("text_pair",), "text/label", seed,
            encode=lambda rows, reps: self._encode(rows, tokenizer, reps), fit=self._set_labels)
        self.weights = self._class_weights(train["labels"])
        return train, eval_, reports

    def _set_labels(self, records: list[dict]) -> None:
        seen = {_label_text(r["label"]) for r in records}
        self.label_type = "int" if all(isinstance(r["label"], int) and not isinstance(r["label"], bool)
                                       for r in records) else "str"  # fmt: skip
        if not self.labels:
            self.labels = sorted(seen, key=lambda x: (int(x) if self.label_type == "int" else 0, x))
        if len(self.labels) < 2:
            raise DataError(f"classification needs at least 2 classes; the training data has {self.labels}")

    def _encode(self, rows: list, tokenizer, reports: list[DatasetReport]) -> dict:
        index = {name: i for i, name in enumerate(self.labels)}
        max_length, overflow = self.cfg.data.max_length, self.cfg.data.overflow
        out = {"input_ids": [], "token_type_ids": [], "labels": []}
        lengths: dict[int, list[int]] = {}
        for origin, r in rows:
            report = reports[r["_report"]]
            label = _label_text(r["label"])
            if label not in index:
                raise DataError(f"{origin}: label {r['label']!r} is not a class of this run "
                                f"({', '.join(self.labels)}); fix the label, or list every class in "
                                "classification.labels")  # fmt: skip
            enc = tokenizer(*_texts(r), truncation=False)
            outcome = length_outcome(len(enc["input_ids"]), max_length, overflow, origin)
            if outcome == DROP_TOO_LONG:
                report.dropped[outcome] += 1
                continue
            if outcome == "truncate":  # the tokenizer's truncation keeps the closing special tokens
                report.truncated += 1
                enc = tokenizer(*_texts(r), truncation=True, max_length=max_length)
            out["input_ids"].append(enc["input_ids"])
            out["token_type_ids"].append(enc.get("token_type_ids") or [0] * len(enc["input_ids"]))
            out["labels"].append(index[label])
            report.kept += 1
            report.tokens += len(enc["input_ids"])
            report.supervised_kept += 1  # one supervised unit per example
            lengths.setdefault(r["_report"], []).append(len(enc["input_ids"]))
        for i, report in enumerate(reports):
            report.set_lengths(lengths.get(i, []))
        if "token_type_ids" not in tokenizer.model_input_names:  # decoder backbones take no segment ids
            del out["token_type_ids"]
        return out

    def _class_weights(self, labels: list[int]) -> torch.Tensor | None:
        if self.cfg.classification.class_weights != "balanced":
            return None
        counts = torch.bincount(torch.tensor(labels), minlength=len(self.labels)).double()
        return (len(labels) / (len(self.labels) * counts.clamp(min=1))).float()  # sklearn's "balanced"

    # ------------------------------------------------------------------ model, loss, batches

    def load_model(self, precision: str, tokenizer):
        from transformers import AutoModelForSequenceClassification

        from sftlab.model.load import frozen_dtype, label_kwargs, load_model

        lm = load_model(self.cfg.model, frozen_dtype(self.cfg.train.method, precision), AutoModelForSequenceClassification,
                        **label_kwargs(self.labels))  # fmt: skip
        if getattr(lm.config, "pad_token_id", None) is None:  # decoder backbones find the last token by padding
            lm.config.pad_token_id = tokenizer.pad_token_id
        return lm

    def loss_module(self, lm) -> torch.nn.Module:
        return ClassificationLoss(lm, self.weights)

    def collate(self, pad_id: int, layout: str = "padded"):
        return lambda rows: collate(rows, pad_id)

    def count(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def row_tokens(self, row: dict) -> int:
        return len(row["input_ids"])

    # ------------------------------------------------------------------ evaluation and outputs

    def metrics(self, model, tokenizer, eval_data, out: Path | None = None) -> dict:
        columns = [c for c in ("input_ids", "token_type_ids") if c in eval_data.column_names]
        rows = [dict(zip(columns, values)) for values in zip(*(eval_data[c] for c in columns))]
        probs = predict_probs(model, rows, tokenizer.pad_token_id)
        gold = list(eval_data["labels"])
        pred = probs.argmax(-1).tolist()
        scores = classification_metrics(gold, pred, len(self.labels))
        if out is not None:
            write_confusion(out, scores.pop("confusion"), self.labels)
        else:
            scores.pop("confusion")
        return {f"eval_{k}": v for k, v in scores.items()}

    def chat_template(self, tokenizer) -> None:
        return None

    def save_extras(self, out: Path, tokenizer, model) -> None:
        (Path(out) / LABELS_FILE).write_text(json.dumps({"labels": self.labels, "type": self.label_type}, indent=1))


class ClassificationLoss(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module, weights: torch.Tensor | None):
        super().__init__()
        self.lm = lm
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, labels: torch.Tensor, **inputs) -> torch.Tensor:
        logits = self.lm(**inputs).logits.float()
        return F.cross_entropy(logits, labels, weight=self.weights, reduction="sum")


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)[0]
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    return batch


def _texts(r: dict) -> tuple[str, str | None]:
    """(text, text_pair) as the tokenizer takes them: a number in either (a JSON 42) as its text."""
    pair = r.get("text_pair")
    return str(r["text"]), None if pair is None else str(pair)


def _label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@torch.no_grad()
def predict_probs(model, rows: list[dict], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """[len(rows), classes] probabilities, batches of similar length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    probs = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([rows[i] for i in idx], pad_id)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        for i, p in zip(idx, logits.softmax(-1).cpu()):
            probs[i] = p
    model.train(was_training)
    return torch.stack(probs)


def predict_file(run_dir: str, input_path: str, output_path: str, batch_size: int = 32) -> int:
    """`sftlab predict`: one {label, probs} JSONL line per input record; returns how many were written."""
    loaded = load_run(run_dir, "classification")
    tokenizer, max_length = loaded.tokenizer, loaded.cfg.data.max_length
    labels, label_type = load_labels(Path(run_dir))
    rows = []
    for r in input_records(input_path, "text", ("text_pair",)):
        enc = tokenizer(*_texts(r), truncation=True, max_length=max_length)
        rows.append({k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc})
    probs = predict_probs(loaded.model, rows, tokenizer.pad_token_id, batch_size)
    with open(output_path, "w", encoding="utf-8") as f:
        for p in probs.tolist():
            best = labels[max(range(len(p)), key=p.__getitem__)]
            label = int(best) if label_type == "int" else best  # as the training data wrote it
            f.write(json.dumps({"label": label, "probs": {name: round(v, 6) for name, v in zip(labels, p)}},
                               ensure_ascii=False) + "\n")  # fmt: skip
    return len(rows)


def input_records(path: str, field: str, optional: tuple[str, ...] = ()) -> list[dict]:
    """predict/translate input: a .txt file (one `field` a line) or records with that field."""
    if not Path(path).is_file():
        raise DataError(f"--input {path}: no such file")
    if path.endswith(".txt"):
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"--input {path}: no lines")
        return [{field: line} for line in lines]
    return [r for _, r in load_field_records(path, (field,), optional).records]


def classification_metrics(gold: list[int], pred: list[int], classes: int) -> dict:
    """Accuracy, macro/micro F1, macro precision/recall (percent) and the confusion matrix
    (rows: gold, columns: predicted). Written out rather than importing scikit-learn for five formulas."""
    cm = torch.zeros((classes, classes), dtype=torch.long)
    for g, p in zip(gold, pred):
        cm[g, p] += 1
    tp = cm.diag().double()
    predicted, actual = cm.sum(0).double(), cm.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))  # fmt: skip
    present = actual > 0  # classes absent from the gold labels do not drag the macro averages down
    n = max(len(gold), 1)
    return {
        "accuracy": 100 * float(tp.sum()) / n,
        "f1_macro": 100 * float(f1[present].mean()),
        "f1_micro": 100 * float(tp.sum()) / n,  # single-label: micro F1 = accuracy
        "precision_macro": 100 * float(precision[present].mean()),
        "recall_macro": 100 * float(recall[present].mean()),
        "confusion": cm.tolist(),
    }


def write_confusion(out: Path, confusion: list[list[int]], labels: list[str]) -> None:
    """eval/confusion.json and eval/confusion.png (shown in the HTML report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "confusion.json").write_text(json.dumps({"labels": labels, "matrix": confusion}))
    size = max(3.0, 0.55 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size), dpi=90)
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (eval)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "confusion.png")
    plt.close(fig)
