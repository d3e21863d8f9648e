"""Data versions: per-record ids and hashes in clean/split manifests, and `sftlab data diff` between two of them."""

import json

import pytest
from conftest import write_jsonl

from sftlab.cli import main
from sftlab.curate.versions import diff, manifest_json, read_entries, record_digest, record_entries
from sftlab.errors import DataError
from sftlab.files import file_digest


def _row(i, output=None, with_id=True):
    row = {"instruction": f"Explain item number {i} in one sentence.",
           "output": output or f"Item {i} is the {i}th entry of the catalogue, listed under section {i % 3}."}  # fmt: skip
    return {"id": f"r{i}", **row} if with_id else row


def _versions(tmp_path, with_id=True):
    """v1: records 1-5; v2: 3 removed, 2 edited, 6 added."""
    v1 = [_row(i, with_id=with_id) for i in range(1, 6)]
    v2 = [_row(1, with_id=with_id), _row(2, "Item 2 was renamed; it now heads the catalogue.", with_id)]
    v2 += [_row(i, with_id=with_id) for i in (4, 5, 6)]
    return write_jsonl(tmp_path / "v1.jsonl", v1), write_jsonl(tmp_path / "v2.jsonl", v2)


def _clean(data, out):
    assert main(["data", "clean", str(data), "--output", str(out)]) == 0
    return out / "manifest.json"


def test_clean_manifest_lists_every_kept_record_and_keeps_its_old_fields(tmp_path):
    v1, _ = _versions(tmp_path)
    manifest_file = _clean(v1, tmp_path / "a")
    manifest = json.loads(manifest_file.read_text())
    assert {"tool", "inputs", "outputs", "settings", "counts"} <= set(manifest)  # what older readers use
    lines = (tmp_path / "a" / "kept.jsonl").read_text().splitlines()
    assert [e["id"] for e in manifest["records"]] == ["r1", "r2", "r3", "r4", "r5"]
    for entry, line in zip(manifest["records"], lines):
        assert entry["file"] == "kept.jsonl" and json.loads(lines[entry["line"] - 1])["id"] == entry["id"]
        assert entry["sha256"] == record_digest(json.loads(line))  # canonical JSON: key order does not matter
    one_line = [x for x in manifest_file.read_text().splitlines() if x.startswith('  {"file":"kept.jsonl"')]
    assert len(one_line) == 5  # a record's entry is one line (greppable by id), not one per field


def test_diff_finds_the_added_removed_and_changed_record(tmp_path, capsys):
    v1, v2 = _versions(tmp_path)
    a, b = _clean(v1, tmp_path / "a"), _clean(v2, tmp_path / "b")
    capsys.readouterr()
    out = tmp_path / "diff.json"
    assert main(["data", "diff", str(a), str(tmp_path / "b"), "--output", str(out)]) == 0  # a file or its directory
    printed = capsys.readouterr().out
    assert "added 1, removed 1, changed 1, moved 0, unchanged 3" in printed
    assert "added    r6" in printed and "removed  r3" in printed and "changed  r2" in printed
    assert file_digest(a) in printed  # the sha256 a run's summary.json lists under data_manifests
    full = json.loads(out.read_text())
    assert full["counts"] == {"added": 1, "removed": 1, "changed": 1, "moved": 0, "unchanged": 3}
    assert [e["id"] for e in full["added"]] == ["r6"] and full["added"][0]["line"] == 5
    assert [e["id"] for e in full["removed"]] == ["r3"]
    (changed,) = full["changed"]
    assert changed["id"] == "r2" and changed["a"]["sha256"] != changed["b"]["sha256"]
    assert full["a"] == {"path": str(a), "sha256": file_digest(a), "records": 5} 
    assert full["b"] == {"path": str(b), "sha256": file_digest(b), "records": 5}


def test_without_id_fields_an_edit_is_one_removed_and_one_added(tmp_path):
    v1, v2 = _versions(tmp_path, with_id=False)
    result = diff(read_entries(_clean(v1, tmp_path / "a")), read_entries(_clean(v2, tmp_path / "b")))
    assert result["counts"] == {"added": 2, "removed": 2, "changed": 0, "moved": 0, "unchanged": 3}
    assert all(e["id"].startswith("sha256:") for e in result["added"] + result["removed"])


def test_ids_are_stable_under_insertion_and_repeats_are_numbered():
    rows = [{"text": "a"}, {"text": "b"}, {"text": "a"}, {"id": 7, "text": "c"}, {"id": 7, "text": "d"}]
    entries = record_entries([("x.jsonl", rows)])
    ids = [e["id"] for e in entries]
    assert ids[0] == f"sha256:{record_digest({'text': 'a'})[:16]}" and ids[2] == ids[0] + "#2"
    assert ids[3:] == ["7", "7#2"] and [e["line"] for e in entries] == [1, 2, 3, 4, 5]
    shifted = record_entries([("x.jsonl", [{"text": "new"}, *rows])])
    assert [e["id"] for e in shifted[1:]] == ids  # an insertion changes no other record's id
    assert record_digest({"b": 1, "a": [1, "é"]}) == record_digest({"a": [1, "é"], "b": 1})


def test_split_manifests_record_every_split_and_a_reshuffle_is_moves_only(tmp_path):
    data = write_jsonl(tmp_path / "all.jsonl", [_row(i) for i in range(1, 21)])
    for name, seed in (("a", "1"), ("b", "2")):
        assert main(["data", "split", str(data), "--output", str(tmp_path / name), "--seed", seed,
                     "--ratios", "0.5,0.5", "--names", "train,test"]) == 0  # fmt: skip
    entries = read_entries(tmp_path / "a")
    assert sorted(e["id"] for e in entries) == sorted(f"r{i}" for i in range(1, 21))
    for e in entries:
        line = (tmp_path / "a" / e["file"]).read_text().splitlines()[e["line"] - 1]
        assert json.loads(line)["id"] == e["id"]
    result = diff(entries, read_entries(tmp_path / "b"))
    counts = result["counts"]
    assert counts["added"] == counts["removed"] == counts["changed"] == 0
    assert counts["moved"] > 0 and counts["moved"] + counts["unchanged"] == 20


def test_a_manifest_without_records_is_a_clear_error_naming_it(tmp_path, capsys):
    v1, _ = _versions(tmp_path)
    new = _clean(v1, tmp_path / "a")
    old = tmp_path / "old" / "manifest.json"
    old.parent.mkdir()
    manifest = json.loads(new.read_text())
    del manifest["records"]
    old.write_text(json.dumps(manifest, indent=1))
    capsys.readouterr()
    assert main(["data", "diff", str(old), str(new)]) == 2
    err = capsys.readouterr().err
    assert str(old) in err and "no per-record entries" in err and "rerun" in err
    with pytest.raises(DataError, match="no such manifest"):
        read_entries(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not a JSON manifest"):
        read_entries(tmp_path / "bad.json")


def test_manifest_json_is_json():
    m = {"tool": "x", "counts": {"a": 1}, "records": [{"id": "1", "sha256": "ab"}, {"id": "2", "sha256": "cd"}]}
    assert json.loads(manifest_json(m)) == m
    assert json.loads(manifest_json({**m, "records": []}))["records"] == []
    assert json.loads(manifest_json({"records": []})) == {"records": []}
