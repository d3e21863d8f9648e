"""Bad files and bad values (tests/fixtures/bad/): each is read correctly where that is unambiguous, or
refused with its file, the record's first line (or index) and the field; never a traceback, never "nan"."""

import csv

import pytest
from conftest import FIXTURES

from sftlab.data.formats import load_conversations, load_field_records
from sftlab.errors import DataError

BAD = FIXTURES / "bad"


def texts(res):
    return [[m.content for m in c.messages] for c in res.conversations]


def refused(name, match, loader=load_conversations, **kw):
    with pytest.raises(DataError, match=match):
        loader(str(BAD / name), **kw)


def skipped(name, loader=load_conversations, **kw):
    return loader(str(BAD / name), on_bad_record="skip", **kw)


@pytest.fixture
def small_csv_fields():
    """A 40-character csv field size limit, so that the fixture over it stays small."""
    old = csv.field_size_limit(40)
    yield
    csv.field_size_limit(old)


# --------------------------------------------------------------------------- a bad value is refused where it is

BAD_RECORDS = [  # fixture, message (file:line: ... field ...), skipped kinds, records kept
    ("nan.jsonl", r"nan\.jsonl:2: field 'output' is NaN, which is neither text nor a JSON number", {"bad value": 1}, 1),
    ("infinity.jsonl", r"infinity\.jsonl:1: field 'messages\[1\]\.content' is Infinity", {"bad value": 1}, 0),
    ("neg_infinity.json", r"neg_infinity\.json: record 2: field 'output' is -Infinity", {"bad value": 1}, 1),
    ("nan.parquet", r"nan\.parquet: row 2: field 'input' is nan, a number where text is expected", {"bad value": 1}, 1),
    ("empty_cell.csv", r"empty_cell\.csv:3: field 'output' is missing", {"missing field": 1}, 1),
    ("deep.jsonl", r"deep\.jsonl:2: field 'meta' is nested 3000 levels deep, deeper than the JSON reader can follow",
     {"too deeply nested": 1}, 2),
    ("deep_arguments.jsonl", r"deep_arguments\.jsonl:1: a JSON string in the record \(tool call arguments.* nested",
     {"too deeply nested": 1}, 0),
    ("extra_fields.csv", r"extra_fields\.csv:3: the row has 3 fields but the header names 2: field 3 \(' b'\) has no",
     {"extra fields": 1}, 1),
    ("surrogate.jsonl", r"surrogate\.jsonl:2: field 'output' holds the lone surrogate \\ud800", {"bad text": 1}, 1),
    ("nul.jsonl", r"nul\.jsonl:2: the line has a NUL byte at column 22: the file looks binary or UTF-16",
     {"NUL byte": 1}, 1),
    ("only_bad.jsonl", r"only_bad\.jsonl:1: malformed JSON at column 1", {"malformed JSON": 2}, 0),
    ("utf16.jsonl", r"utf16\.jsonl:1: byte 1 of the line is not UTF-8; re-save the file as UTF-8 \(it is UTF-16",
     {"not UTF-8": 1, "NUL byte": 1}, 0),  # its last "line" is the NUL of the newline
    ("multiline.csv", r"multiline\.csv:4: field 'output' is missing", {"missing field": 1}, 1),
    ("stray_quote.csv", r"stray_quote\.csv:2: field 'output' has text after its closing quote", {"bad quoting": 1}, 1),
    ("bad_utf8.jsonl", r"bad_utf8\.jsonl:2: byte 21 of the line is not UTF-8; re-save .* in field 'instruction'\)",
     {"not UTF-8": 1}, 1),
    ("bad_utf8.csv", r"bad_utf8\.csv:3: field 'instruction' has the byte 0xe9, which is not UTF-8",
     {"not UTF-8": 1}, 1),
    ("bad_element.json", r"bad_element\.json: record 2: expected a JSON object, got int", {"not an object": 1}, 2),
]  # fmt: skip


@pytest.mark.parametrize("name, match, kinds, kept", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_a_bad_record_names_file_line_and_field_or_is_skipped_and_counted(name, match, kinds, kept):
    refused(name, match + ".*on_bad_record=skip")
    res = skipped(name)
    assert res.skipped == kinds and len(res.conversations) == kept
    assert res.read == kept + sum(kinds.values())
    assert not any(t in ("nan", "inf", "-inf") for conv in texts(res) for t in conv)


def test_a_field_over_the_csv_limit_names_its_first_line_and_the_rest_is_read(small_csv_fields):
    refused("long_field.csv", r"long_field\.csv:3: field 'output' is longer than 40 characters, the CSV reader's "
            r"limit; keep texts this long in a \.jsonl file")  # fmt: skip
    res = skipped("long_field.csv")  # the quoted field runs over two lines; reading goes on after it
    assert res.skipped == {"field too long": 1} and texts(res) == [["q", "a"], ["q3", "a3"]]
    assert res.conversations[1].origin.endswith("long_field.csv:5")


def test_json_too_deep_for_the_parser_names_line_record_and_field():
    refused("deep.json", r"deep\.json:4: record 2: field 'meta' is nested 3001 levels deep")


# --------------------------------------------------------------------------- read correctly where unambiguous


def test_an_empty_csv_cell_is_missing_and_the_text_nan_stays_text():
    res = load_conversations(str(BAD / "cells.csv"))
    assert texts(res) == [["q", "a"], ["q2\n\nNaN", "a2"]]  # no "\n\n" for the empty input; no pandas NaN


def test_a_utf8_byte_order_mark_on_a_jsonl_file_is_read():
    res = load_conversations(str(BAD / "bom.jsonl"))
    assert res.format == "alpaca" and texts(res) == [["q", "a"], ["q2", "a2"]]


def test_bare_carriage_returns_end_lines():
    """A raw CR cannot stand inside a JSON string, so each CR ends a line of JSONL as it does in editors
    (classic Mac line endings); lines are counted so."""
    refused("bare_cr.jsonl", r"bare_cr\.jsonl:3: field 'output' is missing")
    res = skipped("bare_cr.jsonl")
    assert texts(res) == [["q", "a"], ["q2", "a2"]] and res.conversations[1].origin.endswith("bare_cr.jsonl:2")
    res = load_conversations(str(BAD / "bare_cr.csv"))
    assert texts(res) == [["q", "a"], ["two\rlines", "b"]] and res.conversations[1].origin.endswith("bare_cr.csv:3")


def test_a_csv_record_over_several_lines_has_its_first_line_as_origin():
    res = skipped("multiline.csv")
    assert texts(res) == [["line one\nline two", "a"]] and res.conversations[0].origin.endswith("multiline.csv:2")


def test_a_valid_surrogate_pair_escape_is_one_character():
    assert texts(skipped("surrogate.jsonl"))[0] == ["q", "ok \N{GRINNING FACE}"]


# --------------------------------------------------------------------------- faults that stop the whole file


@pytest.mark.parametrize("name, match", [
    ("unterminated.csv", r"unterminated\.csv:3: field 'instruction' opens a quote that is never closed, so the rest"),
    ("duplicate_column.csv", r"duplicate_column\.csv:1: the header names column 'output' twice"),
    ("utf16.csv", r"utf16\.csv:1: the header row is not UTF-8 text \(the file may be UTF-16"),
    ("deep.json", r"deep\.json:4: record 2: field 'meta'"),
    ("empty.json", r"empty\.json: the file is empty; a \.json file holds an array of records"),
    ("empty.jsonl", r"empty\.jsonl: the dataset is empty"),
    ("empty.csv", r"empty\.csv: the dataset is empty"),
    ("header_only.csv", r"header_only\.csv: the dataset is empty"),
])  # fmt: skip
def test_a_file_that_cannot_be_split_into_records_stops_even_when_skipping(name, match):
    refused(name, match)
    refused(name, match, on_bad_record="skip")


# --------------------------------------------------------------------------- flat records: labels and texts


@pytest.mark.parametrize("name, match", [
    ("labels_nan.jsonl", r"labels_nan\.jsonl:2: field 'label' is NaN"),
    ("labels_nan.parquet", r"labels_nan\.parquet: row 2: field 'label' is nan, a number where text or a label"),
    ("labels_list.jsonl", r"labels_list\.jsonl:1: field 'text' must be text or a number, got list"),
])  # fmt: skip
def test_a_label_or_text_that_is_no_value_is_refused(name, match):
    refused(name, match, load_field_records, fields=("text", "label"))
    assert skipped(name, load_field_records, fields=("text", "label")).skipped.total() == 1


def test_csv_labels_keep_the_text_nan_and_an_empty_one_is_missing():
    res = skipped("labels.csv", load_field_records, fields=("text", "label"))
    assert [r for _, r in res.records] == [{"text": "good", "label": "NaN"}]
    assert res.skipped == {"missing label": 1}
    refused("labels.csv", r"labels\.csv:3: missing field 'label'", load_field_records, fields=("text", "label"))
