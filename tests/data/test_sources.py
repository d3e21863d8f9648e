"""Datasets that are not files: a Hugging Face dataset repository (loaded by datasets.load_dataset, offline)
and a save_to_disk directory, read like files (format detection, column maps, reports)."""

import pytest
from conftest import write_jsonl

from sftlab.config import load_config
from sftlab.data import dataset
from sftlab.errors import DataError


def _repo(tmp_path, n_train=10, n_test=4):
    """A dataset repository as the hub holds one: data files per split, which load_dataset reads offline."""
    repo = tmp_path / "org-chats"
    (repo / "data").mkdir(parents=True, exist_ok=True)
    row = lambda i, split: {"question": f"{split} question {i}?", "reply": f"{split} answer {i}."}  # noqa: E731
    write_jsonl(repo / "data" / "train.jsonl", [row(i, "train") for i in range(n_train)])
    write_jsonl(repo / "data" / "test.jsonl", [row(i, "test") for i in range(n_test)])
    return repo


def _cfg(*specs, **data):
    extra = [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, [f"data.train=[{', '.join(specs)}]", "data.template=chatml", "data.cache=false", *extra])


def test_a_dataset_repository_loads_by_split_with_slicing_and_column_maps(tmp_path, smol_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = _repo(tmp_path)
    columns = "columns: {instruction: question, output: reply}"
    split = dataset.load_split(_cfg(f"{{hf: {repo}, split: 'train[:50%]', format: alpaca, {columns}}}").data, smol_tok)
    [report] = split.reports
    assert (report.read, report.kept, report.format) == (5, 5, "alpaca")
    assert report.name == f"{repo}[train[:50%]]"
    text = smol_tok.decode(split.dataset[0]["input_ids"])
    assert "train question 0?" in text and "train answer 0." in text
    test = dataset.load_split(_cfg(f"{{hf: {repo}, split: test, {columns}}}").data, smol_tok)
    assert test.reports[0].read == 4 and test.reports[0].format == "alpaca"  # auto-detected after the map


def test_a_save_to_disk_directory_is_a_dataset(tmp_path, smol_tok):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(6)]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "eval": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dict"))  # fmt: skip
    assert dataset.load_split(_cfg(str(tmp_path / "saved")).data, smol_tok).reports[0].kept == 6
    assert dataset.load_split(_cfg(f"{{path: {tmp_path / 'dict'}, split: eval}}").data, smol_tok).reports[0].kept == 4
    with pytest.raises(DataError, match=r"has splits \['eval', 'train'\], not 'test'"):
        dataset.load_split(_cfg(f"{{path: {tmp_path / 'dict'}, split: test}}").data, smol_tok)


def test_a_hub_id_neither_online_nor_cached_is_a_clear_error(tmp_path, smol_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"hf: nobody/no-such-set, split train: not found in the local HF cache "
                                        r"\(HF_HUB_OFFLINE=1\).*huggingface-cli download --repo-type dataset"):
        dataset.load_split(_cfg("{hf: nobody/no-such-set}").data, smol_tok)


def test_the_tokenized_cache_follows_the_source(tmp_path, smol_tok, monkeypatch, tmp_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    repo = _repo(tmp_path)
    spec = f"{{hf: {repo}, columns: {{instruction: question, output: reply}}}}"
    cfg = load_config(None, [f"data.train=[{spec}]", "data.template=chatml"])
    assert dataset.load_split(cfg.data, smol_tok).cache_hits == 0
    assert dataset.load_split(cfg.data, smol_tok).cache_hits == 1
    _repo(tmp_path, n_train=12)  # the repository changed: tokenized again
    again = dataset.load_split(cfg.data, smol_tok)
    assert again.cache_hits == 0 and again.reports[0].read == 12
