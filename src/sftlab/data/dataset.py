"""Dataset specs -> one tokenized Arrow dataset per split, cached, with a report per dataset.

The cache key covers everything that changes the tokens: the data files' content, the tokenizer,
the template source and the length/mask settings. Same inputs: a second run loads the Arrow
files and skips tokenization; any change re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sftlab.config import DataConfig, DatasetSpec
from sftlab.data.formats import expand_paths, load_conversations
from sftlab.data.templates import ChatTemplate, end_of_turn_ids
from sftlab.data.tokenize import DatasetReport, Encoder, encode_dataset
from sftlab.errors import DataError
from sftlab.files import atomic_dir, cache_root, file_digest

CACHE_VERSION = 2  # bump when tokenization logic changes so old caches are not reused


@dataclass
class TokenizedSplit:
    dataset: "datasets.Dataset"  # noqa: F821  columns input_ids, labels
    reports: list[DatasetReport]
    cache_hits: int = 0


def load_split(cfg: DataConfig, tokenizer, split: str = "train") -> TokenizedSplit:
    """Tokenize every dataset of `data.<split>`; raises if nothing usable remains."""
    import datasets

    specs: list[DatasetSpec] = getattr(cfg, split)
    if not specs:
        raise DataError(f"data.{split} lists no datasets; add one: data.{split}: [{{path: file.jsonl}}]")
    template = ChatTemplate(tokenizer, cfg.template, cfg.template_kwargs)
    parts, reports, hits = [], [], 0
    for spec in specs:
        key = cache_key(spec, cfg, tokenizer, template.source)
        cached = _cache_dir() / key
        if cfg.cache and (cached / "report.json").is_file():
            parts.append(datasets.load_from_disk(str(cached / "data")))
            reports.append(DatasetReport.from_dict(json.loads((cached / "report.json").read_text())))
            hits += 1
            continue
        ds, report = _tokenize_spec(spec, cfg, tokenizer, template)
        if cfg.cache:
            _store(cached, ds, report)
        parts.append(ds)
        reports.append(report)
    data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(data) == 0:
        raise DataError(f"data.{split}: no examples left after the length policy and skips; see the report")
    return TokenizedSplit(data, reports, hits)


def load_train_eval(cfg: DataConfig, tokenizer, seed: int):
    """(train, eval or None, {split: reports}); eval comes from data.eval, else a held-out data.eval_split."""
    train = load_split(cfg, tokenizer, "train")
    reports = {"train": train.reports}
    if cfg.eval:
        ev = load_split(cfg, tokenizer, "eval")
        reports["eval"] = ev.reports
        return train.dataset, ev.dataset, reports
    if cfg.eval_split > 0:
        return *hold_out(train.dataset, cfg.eval_split, seed), reports
    return train.dataset, None, reports


def hold_out(data, fraction: float, seed: int):
    """(train, eval): the one eval split, a seeded data.eval_split share of the training examples."""
    if len(data) < 2:
        raise DataError("data.eval_split needs at least 2 training examples")
    parts = data.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def _tokenize_spec(spec: DatasetSpec, cfg: DataConfig, tokenizer, template: ChatTemplate):
    import datasets

    loaded = load_conversations(spec.path, spec.format, spec.columns, cfg.on_bad_record, cfg.system_prompt, spec.tools,
                                spec.tags)  # fmt: skip
    report = DatasetReport(name=spec.label, format=loaded.format, read=loaded.read)
    report.dropped.update({f"bad record: {k}": n for k, n in loaded.skipped.items()})
    encoder = Encoder(tokenizer, template, cfg.train_on, end_of_turn_ids(tokenizer), cfg.reasoning)
    kept = encode_dataset(encoder, loaded.conversations, cfg, report)
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "labels": datasets.Sequence(datasets.Value("int32"))}
    )
    ds = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept]}, features=features
    )
    return ds, report


def cache_key(spec: DatasetSpec, cfg: DataConfig, tokenizer, template_source: str) -> str:
    files = [(p.name, file_digest(p)) for p in expand_paths(spec.path)]
    payload = {
        "version": CACHE_VERSION,
        "files": files,
        "format": spec.format,
        "columns": spec.columns,
        "tools": spec.tools,
        "tags": spec.tags,
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


def _store(target: Path, ds, report: DatasetReport) -> None:
    with atomic_dir(target) as tmp:
        ds.save_to_disk(str(tmp / "data"))
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
