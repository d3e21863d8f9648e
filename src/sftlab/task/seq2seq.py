"""task: seq2seq. Records {source, target} -> an encoder-decoder (Marian, T5, BART families); loss on
every target token (padding masked), summed and divided once per step like chat SFT; evaluation
translates the eval sources and scores them with BLEU and chrF (sacrebleu)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sftlab.config import Config
from sftlab.data.batching import pad
from sftlab.data.tokenize import DROP_TOO_LONG, IGNORE, DatasetReport, length_outcome
from sftlab.errors import ModelError
from sftlab.rundir import load_run
from sftlab.task.base import load_record_splits
from sftlab.task.classification import input_records

KEYS = {"source": "data.max_length", "target": "seq2seq.max_target_length"}


class Seq2Seq:
    name = "seq2seq"
    causal_decoder = False
    final_eval_file = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def load_data(self, tokenizer, seed: int):
        return load_record_splits(self.cfg.data, ("source", "target"), (), "source/target", seed,
                                  encode=lambda rows, reps: self._encode(rows, tokenizer, reps))

    def _encode(self, rows: list, tokenizer, reports: list[DatasetReport]) -> dict:
        limits = {"source": self.cfg.data.max_length, "target": self.cfg.seq2seq.max_target_length}
        out = {"input_ids": [], "labels": [], "source": [], "target": []}
        lengths: dict[int, list[int]] = {}
        for origin, r in rows:
            report = reports[r["_report"]]
            source = self.cfg.seq2seq.source_prefix + str(r["source"])
            ids = {"source": tokenizer(source)["input_ids"], "target": tokenizer(text_target=str(r["target"]))["input_ids"]}
            outcomes = {k: length_outcome(len(ids[k]), limits[k], self.cfg.data.overflow, origin, f"the {k}", KEYS[k])
                        for k in ids}  # fmt: skip
            if DROP_TOO_LONG in outcomes.values():
                report.dropped[DROP_TOO_LONG] += 1
                report.supervised_lost += len(ids["target"])
                continue
            if "truncate" in outcomes.values():
                report.truncated += 1
                report.supervised_lost += max(0, len(ids["target"]) - limits["target"])
                # cut inside the text but keep the closing EOS, so the model still learns to stop
                ids = {k: v if len(v) <= limits[k] else v[: limits[k] - 1] + v[-1:] for k, v in ids.items()}
            out["input_ids"].append(ids["source"])
            out["labels"].append(ids["target"])
            out["source"].append(str(r["source"]))
            out["target"].append(str(r["target"]))
            report.kept += 1
            report.tokens += len(ids["source"]) + len(ids["target"])
            report.supervised_kept += len(ids["target"])
            lengths.setdefault(r["_report"], []).append(len(ids["source"]))
        for i, report in enumerate(reports):
            report.set_lengths(lengths.get(i, []))
        return out

    def load_model(self, precision: str, tokenizer):
        from transformers import AutoModelForSeq2SeqLM

        from sftlab.model.load import frozen_dtype, load_model

        lm = load_model(self.cfg.model, frozen_dtype(self.cfg.train.method, precision), AutoModelForSeq2SeqLM)
        if lm.config.decoder_start_token_id is None:
            raise ModelError(f"{self.cfg.model.name}: config.json sets no decoder_start_token_id; add it "
                            "(T5 and Marian use the pad token id)")  # fmt: skip
        return lm

    def loss_module(self, lm) -> torch.nn.Module:
        return Seq2SeqLoss(lm)

    def collate(self, pad_id: int, layout: str = "padded"):
        return lambda rows: collate(rows, pad_id)

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def row_tokens(self, row: dict) -> int:
        return len(row["input_ids"]) + len(row["labels"])

    def metrics(self, model, tokenizer, eval_data, out: Path | None = None) -> dict:
        from sftlab.metrics.text import bleu, chrf

        limit = self.cfg.eval.max_examples or len(eval_data)
        sources, refs = eval_data["source"][:limit], eval_data["target"][:limit]
        hyps = translate(model, tokenizer, [self.cfg.seq2seq.source_prefix + s for s in sources],
                         self.cfg.seq2seq.max_target_length, self.cfg.seq2seq.num_beams, self.cfg.eval.batch_size)  # fmt: skip
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
                for s, r, h in zip(sources, refs, hyps):
                    f.write(json.dumps({"source": "eval", "prompt": s, "reference": r, "answer": h}, ensure_ascii=False) + "\n")
        return {"eval_bleu": bleu(hyps, refs), "eval_chrf": chrf(hyps, refs)}

    def chat_template(self, tokenizer) -> None:
        return None

    def save_extras(self, out: Path, tokenizer, model) -> None:
        pass


class Seq2SeqLoss(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, labels: torch.Tensor, **inputs) -> torch.Tensor:
        config = self.lm.config
        decoder_inputs = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
        logits = self.lm(**inputs, decoder_input_ids=decoder_inputs, use_cache=False).logits
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: the start token, then the labels, ignored positions as padding."""
    shifted = labels.new_full(labels.shape, pad_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start_id
    return shifted.masked_fill(shifted == IGNORE, pad_id)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in rows[0]:
        batch["labels"] = pad([r["labels"] for r in rows], IGNORE)[0]
    return batch


@torch.no_grad()
def translate(model, tokenizer, sources: list[str], max_new_tokens: int, num_beams: int = 1,
              batch_size: int = 16) -> list[str]:  # fmt: skip
    """Greedy (or beam) translations, longest sources batched together."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [tokenizer(s)["input_ids"] for s in sources]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    hyps = [""] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([{"input_ids": ids[i]} for i in idx], tokenizer.pad_token_id)
        out = model.generate(**{k: v.to(device) for k, v in batch.items()}, max_new_tokens=max_new_tokens,
                             num_beams=num_beams, do_sample=False)  # fmt: skip
        for i, seq in zip(idx, out):
            hyps[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    model.train(was_training)
    return hyps


def translate_file(run_dir: str, input_path: str, output_path: str | None = None, num_beams: int | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:  # fmt: skip
    """`sftlab translate`: the translations of the input's sources (beams and length default to the run's
    seq2seq settings), also written as {source, translation} JSONL when `output_path` is given."""
    loaded = load_run(run_dir, "seq2seq")
    s2s = loaded.cfg.seq2seq
    sources = [r["source"] for r in input_records(input_path, "source")]
    hyps = translate(loaded.model, loaded.tokenizer, [s2s.source_prefix + s for s in sources],
                     max_new_tokens or s2s.max_target_length, num_beams or s2s.num_beams, batch_size)  # fmt: skip
    if output_path:
        with open(output_path, "w", encoding="utf-8") as f:
            for s, h in zip(sources, hyps):
                f.write(json.dumps({"source": s, "translation": h}, ensure_ascii=False) + "\n")
    return hyps
