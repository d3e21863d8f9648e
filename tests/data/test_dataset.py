"""Dataset specs -> tokenized split: per-dataset reports and the tokenization cache."""

import json

import pytest
from conftest import FIXTURES, write_jsonl

import sftlab.data.dataset as dataset
from sftlab.config import DataConfig, DatasetSpec
from sftlab.errors import DataError


def cfg(*paths, **kw):
    return DataConfig(train=[DatasetSpec(path=str(p)) for p in paths], **kw)


def test_each_dataset_gets_its_own_report(smol_tok, tmp_cache):
    split = dataset.load_split(cfg(FIXTURES / "alpaca.jsonl", FIXTURES / "sharegpt.json"), smol_tok)
    assert len(split.dataset) == 5
    assert [(r.name, r.format, r.read, r.kept) for r in split.reports] == [
        ("alpaca.jsonl", "alpaca", 3, 3), ("sharegpt.json", "sharegpt", 2, 2)]
    row = split.dataset[0]
    assert set(row) == {"input_ids", "labels", "loss_weight", "id", "metadata", "length", "supervised"}
    assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
    assert row["supervised"] == sum(label != -100 for label in row["labels"][1:])


def test_skipped_records_are_counted_in_the_report(smol_tok, tmp_cache, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}, "{oops", {"instruction": "q"}])
    split = dataset.load_split(cfg(path, on_bad_record="skip"), smol_tok)
    (report,) = split.reports
    assert (report.read, report.kept) == (3, 1)
    assert report.dropped == {"bad record: malformed JSON": 1, "bad record: missing field": 1}


def test_template_mismatch_is_a_bad_record(smol_tok, tmp_cache, tmp_path):
    moves = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' if messages | length < 3 else 'model: ' }}{% endif %}")
    with pytest.raises(DataError, match=r"sharegpt.json: record 2: template 'custom' renders"):
        dataset.load_split(cfg(FIXTURES / "sharegpt.json", template=moves), smol_tok)
    split = dataset.load_split(cfg(FIXTURES / "sharegpt.json", template=moves, on_bad_record="skip"), smol_tok)
    assert split.reports[0].dropped == {"bad record: template mismatch": 1}


def test_nothing_left_is_an_error(smol_tok, tmp_cache, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q " * 50, "output": "a"}])
    with pytest.raises(DataError, match="no examples left"):
        dataset.load_split(cfg(path, max_length=16), smol_tok)


def test_no_datasets_configured(smol_tok):
    with pytest.raises(DataError, match=r"data.eval lists no datasets"):
        dataset.load_split(DataConfig(), smol_tok, "eval")


def test_second_run_hits_the_cache_and_skips_tokenization(smol_tok, tmp_cache, monkeypatch, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    first = dataset.load_split(cfg(path), smol_tok)
    assert first.cache_hits == 0

    def boom(*a, **k):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(dataset, "_tokenize_spec", boom)
    second = dataset.load_split(cfg(path), smol_tok)
    assert second.cache_hits == 1
    assert second.dataset.to_dict() == first.dataset.to_dict()
    assert second.reports == first.reports


@pytest.mark.parametrize("change", ["content", "max_length", "template", "train_on", "overflow", "tokenizer"])
def test_any_change_re_tokenizes(smol_tok, tmp_cache, tmp_path, change):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    base = dict(max_length=64, template="auto", train_on="assistant", overflow="truncate")
    tok = smol_tok
    dataset.load_split(cfg(path, **base), tok)
    if change == "content":
        write_jsonl(path, [{"instruction": "q", "output": "b"}])
    elif change == "tokenizer":
        import copy

        tok = copy.deepcopy(smol_tok)
        tok.add_tokens(["<new_token>"])
    else:
        base[change] = {"max_length": 32, "template": "chatml", "train_on": "all", "overflow": "drop"}[change]
    assert dataset.load_split(cfg(path, **base), tok).cache_hits == 0


def test_cache_off(smol_tok, tmp_cache, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    dataset.load_split(cfg(path, cache=False), smol_tok)
    assert not tmp_cache.exists()


def test_cache_entry_holds_report_json(smol_tok, tmp_cache, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    dataset.load_split(cfg(path), smol_tok)
    (entry,) = [p for p in tmp_cache.iterdir()]
    assert json.loads((entry / "report.json").read_text())["kept"] == 1
