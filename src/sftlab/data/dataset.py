"""Dataset specs -> one tokenized Arrow dataset per split, cached, with a report per dataset.

The cache key covers everything that changes the tokens: the data files' content, the tokenizer,
the template source and the length/mask settings. Same inputs: a second run loads the Arrow
files and skips tokenization; any change re-tokenizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sftlab.config import DataConfig, DatasetSpec
from sftlab.data.formats import expand_paths
from sftlab.data.templates import ChatTemplate, end_of_turn_ids
from sftlab.data.tokenize import DatasetReport, Encoder
from sftlab.errors import DataError
from sftlab.files import atomic_dir, cache_root, file_digest, scratch_dir

CACHE_VERSION = 4  # bump when tokenization logic changes so old caches are not reused


@dataclass
class TokenizedSplit:
    dataset: "datasets.Dataset"  # noqa: F821  columns input_ids, labels
    reports: list[DatasetReport]
    cache_hits: int = 0


DATA_FILE = "data.arrow"  # the tokenized examples of one dataset: an Arrow stream, memory-mapped when read
SOURCE = "source"  # eval column: the dataset an example came from, for eval_loss/<name>


def load_split(cfg: DataConfig, tokenizer, split: str = "train", seed: int = 0) -> TokenizedSplit:
    """Tokenize every dataset of `data.<split>`: train as the epoch's mixture (data.mixture), eval whole
    with a `source` column; raises if nothing usable remains."""
    parts, reports, hits = _load_parts(cfg, tokenizer, split)
    return _finish(parts, reports, hits, getattr(cfg, split), split, seed)


def load_train_eval(cfg: DataConfig, tokenizer, seed: int):
    """(train, eval or None, {split: reports}); eval comes from data.eval, else a held-out data.eval_split
    of each training dataset (so each has its own eval loss), taken before the mixture draws from it."""
    if cfg.eval or cfg.eval_split <= 0:
        train = load_split(cfg, tokenizer, "train", seed)
        reports = {"train": train.reports}
        if not cfg.eval:
            return train.dataset, None, reports
        ev = load_split(cfg, tokenizer, "eval", seed)
        return train.dataset, ev.dataset, reports | {"eval": ev.reports}
    parts, reports, hits = _load_parts(cfg, tokenizer, "train")
    held = []
    for i, part in enumerate(parts):
        parts[i], rest = hold_out(part, cfg.eval_split, seed, f"data.train[{i}] ({reports[i].name})")
        held.append(rest)
    train = _finish(parts, reports, hits, cfg.train, "train", seed)
    eval_parts = [_with_source(h, label) for h, label in zip(held, _labels(cfg.train))]
    return train.dataset, _concat(eval_parts), {"train": train.reports}


def hold_out(data, fraction: float, seed: int, what: str = "data.train"):
    """(train, eval): the one eval split, a seeded data.eval_split share of the training examples."""
    if len(data) < 2:
        raise DataError(f"data.eval_split needs at least 2 examples in {what}; it has {len(data)}")
    parts = data.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _load_parts(cfg: DataConfig, tokenizer, split: str):
    specs: list[DatasetSpec] = getattr(cfg, split)
    if not specs:
        raise DataError(f"data.{split} lists no datasets; add one: data.{split}: [{{path: file.jsonl}}]")
    template = ChatTemplate(tokenizer, cfg.template, cfg.template_kwargs)
    parts, reports, hits = [], [], 0
    for spec in specs:
        cached = _cache_dir() / cache_key(spec, cfg, tokenizer, template.source) if cfg.cache else None
        if cached is not None and (cached / "report.json").is_file():
            hits += 1
            report = DatasetReport.from_dict(json.loads((cached / "report.json").read_text()))
        else:
            cached, report = _tokenize_into(cached, spec, cfg, tokenizer, template)
        parts.append(_open(cached / DATA_FILE))
        reports.append(report)
    return parts, reports, hits


def _tokenize_into(target: Path | None, spec: DatasetSpec, cfg: DataConfig, tokenizer,
                   template) -> tuple[Path, DatasetReport]:  # fmt: skip
    """Tokenize one dataset into the cache directory `target` (written atomically), or without the cache
    (None) into a scratch directory removed when the process ends, under the cache root (/tmp may be a
    small tmpfs); the dataset is the memory-mapped file inside it. Returns the directory and the report."""
    if target is None:
        target = scratch_dir("tokenized-")
        writing = contextlib.nullcontext(target)
    else:
        writing = atomic_dir(target)
    with writing as tmp:
        report = _tokenize_spec(spec, cfg, tokenizer, template, tmp / DATA_FILE)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
    return target, report


def _open(path: Path):
    import datasets

    return datasets.Dataset.from_file(str(path))  # memory-mapped: a million examples cost no RAM


def _finish(parts: list, reports: list[DatasetReport], hits: int, specs: list[DatasetSpec], split: str,
            seed: int) -> TokenizedSplit:  # fmt: skip
    from sftlab.data import mixture

    if split == "train":
        chosen = mixture.draw([len(p) for p in parts], specs, seed)
        parts = [p if idx == list(range(len(p))) else p.select(idx) for p, idx in zip(parts, chosen)]
        for part, report in zip(parts, reports):
            report.used, report.used_supervised = len(part), supervised_tokens(part)
    else:
        capped = [mixture.draw([len(p)], [s], seed)[0] for p, s in zip(parts, specs)]
        parts = [_with_source(p.select(idx), label) for p, idx, label in zip(parts, capped, _labels(specs))]
    data = _concat(parts)
    if len(data) == 0:
        raise DataError(f"data.{split}: no examples left after the length policy and skips; see the report")
    return TokenizedSplit(data, reports, hits)


def supervised_tokens(data) -> int:
    """Tokens carrying loss after the causal shift (each row's first label predicts nothing): the sum of the
    `supervised` column the pipeline writes, so the labels are never read."""
    import pyarrow.compute as pc

    return int(pc.sum(data.with_format("arrow")["supervised"]).as_py() or 0)


def _labels(specs: list[DatasetSpec]) -> list[str]:
    """Each dataset's name in eval_loss/<name>: its label, numbered where two share one."""
    labels = [s.label for s in specs]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _with_source(data, label: str):
    return data.add_column(SOURCE, [label] * len(data))


def _concat(parts: list):
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _tokenize_spec(spec: DatasetSpec, cfg: DataConfig, tokenizer, template: ChatTemplate, path: Path):
    """Tokenize one dataset into the Arrow file `path`, streamed and in parallel; its report."""
    from sftlab.data import sources
    from sftlab.data.formats import LoadResult
    from sftlab.data.pipeline import tokenize_to_file

    loaded = LoadResult()
    conversion, records = sources.spec_records(spec, loaded, cfg.system_prompt)
    report = DatasetReport(name=spec.label)
    encoder = Encoder(tokenizer, template, cfg.train_on, end_of_turn_ids(tokenizer), cfg.reasoning)
    tokenize_to_file(records, conversion, encoder, cfg, report, path, spec.loss_weight)
    report.format, report.read = loaded.format, loaded.read
    return report


def cache_key(spec: DatasetSpec, cfg: DataConfig, tokenizer, template_source: str) -> str:
    from sftlab.data import sources

    if sources.is_source(spec):
        files = [("source", sources.fingerprint(spec))]
    else:
        files = [(p.name, file_digest(p)) for p in expand_paths(spec.path)]
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "format": spec.format,
        "columns": spec.columns,
        "tools": spec.tools,
        "tags": spec.tags,
        "loss_weight": spec.loss_weight,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template_source,
        "settings": [cfg.max_length, cfg.overflow, cfg.train_on, cfg.on_bad_record, cfg.system_prompt, cfg.reasoning],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.special_tokens_map, tokenizer.pad_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()


def _cache_dir() -> Path:
    return cache_root() / "tokenized"


