"""Datasets that are not files: a Hugging Face dataset (`{hf: org/name, config, split, revision, data_files}`)
or a directory written by `Dataset.save_to_disk`, read as records like a file's, so format detection and
column maps apply to them unchanged.

Hub datasets load through `datasets.load_dataset`: from the hub, or offline from the local HF cache when
HF_HUB_OFFLINE=1 (or no network). `split` takes the library's slicing (`train[:10%]`, `train[100:200]`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from sftlab.config import DatasetSpec
from sftlab.data.formats import Conversion, LoadResult, Record, iter_records, load_conversations
from sftlab.errors import DataError

SAVED_MARKERS = ("state.json", "dataset_info.json")  # what save_to_disk writes beside the Arrow files


def load_spec(spec: DatasetSpec, on_bad_record: str = "error", system_prompt: str | None = None) -> LoadResult:
    """The conversations of one data.train/data.eval entry, whatever holds them: files, a hub dataset or a
    save_to_disk directory; the entry's format, column map, tools and tags apply alike."""
    name, rows = _reading(spec)
    return load_conversations(name, spec.format, spec.columns, on_bad_record, system_prompt, spec.tools, spec.tags,
                              rows)  # fmt: skip


def spec_records(spec: DatasetSpec, result: LoadResult,
                 system_prompt: str | None = None) -> tuple[Conversion, Iterator[Record]]:  # fmt: skip
    """The records of one entry as read (a JSONL file's lines unparsed), counted in `result` as they stream,
    and the Conversion that turns each into a conversation: what the tokenizing pipeline's workers get, so
    the parsing is theirs and no conversation is pickled on its way to them."""
    name, rows = _reading(spec)
    conversion = Conversion.of(name, spec.columns, system_prompt, spec.tools, spec.tags)
    return conversion, iter_records(name, spec.format, conversion, rows, result, raw=True)


def _reading(spec: DatasetSpec) -> tuple[str, Iterator | None]:
    """(the name records are reported under, the rows of a dataset that is no file, else None: its files)."""
    rows = records(spec) if is_source(spec) else None
    return (spec.label if rows is not None else spec.path), rows


def is_source(spec: DatasetSpec) -> bool:
    """Whether the spec names a hub dataset or a save_to_disk directory rather than data files."""
    return bool(spec.hf) or is_saved(spec.path)


def is_saved(path: str) -> bool:
    p = Path(path) if path else None
    return p is not None and p.is_dir() and ((p / "dataset_dict.json").is_file() or
                                              all((p / m).is_file() for m in SAVED_MARKERS))  # fmt: skip


def load(spec: DatasetSpec):
    """The spec's `datasets.Dataset`; a DataError naming the id (or directory) and what to do."""
    import datasets

    if not spec.hf:
        loaded = datasets.load_from_disk(spec.path)
        if isinstance(loaded, datasets.DatasetDict):
            name = spec.split or "train"
            if name not in loaded:
                raise DataError(f"{spec.path}: the saved dataset has splits {sorted(loaded)}, not {name!r}; set "
                                "`split:` on the dataset")  # fmt: skip
            loaded = loaded[name]
        return loaded
    return _load_hub(spec)


def _load_hub(spec: DatasetSpec):
    import datasets

    try:
        loaded = datasets.load_dataset(spec.hf, spec.config, split=spec.split or "train", revision=spec.revision,
                                       data_files=spec.data_files)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- datasets raises many types (DatasetNotFoundError, ConnectionError, ...)
        raise DataError(_hub_error(spec, e)) from None
    if isinstance(loaded, datasets.DatasetDict):  # no split asked and several there
        raise DataError(f"hf: {spec.hf} has splits {sorted(loaded)}; set `split:` on the dataset")
    return loaded


def _hub_error(spec: DatasetSpec, error: Exception) -> str:
    import os

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    where = "the local HF cache (HF_HUB_OFFLINE=1)" if offline else "the hub or the local HF cache"
    config = f" (config {spec.config})" if spec.config else ""
    return (f"hf: {spec.hf}{config}, split {spec.split or 'train'}: not found in {where}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Fetch it once with network "
            f"(`huggingface-cli download --repo-type dataset {spec.hf}`), or point `path:` at local files")  # fmt: skip


def records(spec: DatasetSpec, data=None) -> Iterator[tuple[str, dict]]:
    """(origin, record) for each row: `origin` names the dataset and row, as file:line does for files."""
    data = load(spec) if data is None else data
    name = spec.hf or spec.path
    for i, row in enumerate(data):
        yield f"{name}[{spec.split or 'train'}]:{i}", dict(row)


def fingerprint(spec: DatasetSpec) -> str:
    """What the tokenized cache keys a source by: the library's fingerprint of the loaded data (it changes
    with the revision, files and split slice), so a changed dataset is tokenized again."""
    data = load(spec)
    identity = [spec.hf, spec.config, spec.split, spec.revision, spec.data_files, getattr(data, "_fingerprint", None)]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
