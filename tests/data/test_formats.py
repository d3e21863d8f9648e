import json

import pytest
from conftest import FIXTURES, write_jsonl

from sftlab.data.formats import Message, load_conversations
from sftlab.errors import DataError


def roles_and_text(conv):
    return [(m.role, m.content) for m in conv.messages]


def test_alpaca_with_input_system_and_history():
    res = load_conversations(str(FIXTURES / "alpaca.jsonl"))
    assert res.format == "alpaca" and res.read == 3
    a, b, c = res.conversations
    assert roles_and_text(a) == [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "2 + 3 = 5.")]
    assert roles_and_text(b) == [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue.")]
    assert roles_and_text(c) == [("user", "Name a fruit."), ("assistant", "Apple."),
                                 ("user", "And another?"), ("assistant", "Red.")]
    assert a.origin.endswith("alpaca.jsonl:1")


def test_sharegpt_aliases_and_system_field():
    res = load_conversations(str(FIXTURES / "sharegpt.json"))
    assert res.format == "sharegpt"
    first, second = res.conversations
    assert roles_and_text(first) == [("user", "Hi there"), ("assistant", "Hello! How can I help?")]
    assert second.messages[0] == Message("system", "You are terse.")
    assert second.messages[-1] == Message("assistant", "你好！")
    assert second.origin.endswith("sharegpt.json: record 2")


def test_messages_with_content_parts():
    res = load_conversations(str(FIXTURES / "messages.jsonl"))
    assert res.format == "messages"
    assert res.conversations[1].messages[0] == Message("user", "What is 1+1?")
    assert len(res.conversations[1].messages) == 4


def test_prompt_completion_strings_and_message_lists():
    res = load_conversations(str(FIXTURES / "prompt_completion.jsonl"))
    assert res.format == "prompt_completion"
    assert roles_and_text(res.conversations[0]) == [("user", "The sky is"), ("assistant", " blue.")]
    assert roles_and_text(res.conversations[1]) == [("user", "Say yes."), ("assistant", "Yes.")]


def test_text_format():
    res = load_conversations(str(FIXTURES / "text.jsonl"))
    assert res.format == "text" and res.conversations[0].text == "Plain text is trained whole."


def test_csv_with_quoted_commas_and_line_origins():
    res = load_conversations(str(FIXTURES / "alpaca.csv"))
    assert res.format == "alpaca"
    assert roles_and_text(res.conversations[1]) == [("user", "Repeat, with a comma\n\na,b"), ("assistant", "a,b")]
    assert res.conversations[1].origin.endswith("alpaca.csv:3")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), tmp_path / "d.parquet")
    res = load_conversations(str(tmp_path / "d.parquet"))
    assert res.format == "prompt_completion" and len(res.conversations) == 2
    assert res.conversations[1].origin.endswith("d.parquet: row 2")


def test_directory_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "c", "completion": "d"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_conversations(str(tmp_path)).read == 2
    assert load_conversations(str(tmp_path / "*.jsonl")).read == 2


def test_column_renames():
    res = load_conversations(str(FIXTURES / "questions.jsonl"), columns={"instruction": "question", "output": "answer"})
    assert res.format == "alpaca"
    assert roles_and_text(res.conversations[0]) == [("user", "Capital of France?"), ("assistant", "Paris.")]


def test_default_system_prompt_only_where_missing():
    res = load_conversations(str(FIXTURES / "messages.jsonl"), system_prompt="Default.")
    assert res.conversations[0].messages[0] == Message("system", "Answer in French.")
    assert res.conversations[1].messages[0] == Message("system", "Default.")


# --------------------------------------------------------------------------- errors name where and what


def bad(tmp_path, lines, match, **kw):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match):
        load_conversations(str(path), **kw)


GOOD = {"instruction": "q", "output": "a"}


def test_malformed_json_names_the_line(tmp_path):
    bad(tmp_path, [GOOD, GOOD, '{"instruction": "q", "output": '], r"bad.jsonl:3: malformed JSON at column \d+")


def test_missing_field_names_record_and_field(tmp_path):
    bad(tmp_path, [GOOD, {"instruction": "q"}], r"bad.jsonl:2: field 'output' is missing", fmt="alpaca")


def test_empty_field(tmp_path):
    bad(tmp_path, [{"instruction": "q", "output": "  "}], r"bad.jsonl:1: field 'output' is empty")


def test_unknown_role(tmp_path):
    msgs = [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]
    bad(tmp_path, [{"messages": msgs}], r"bad.jsonl:1: messages\[1\].role is 'robot'; use one of system, user, assistant")


def test_two_assistant_turns_in_a_row(tmp_path):
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "assistant", "content": "z"}]
    bad(tmp_path, [{"messages": msgs}], r"bad.jsonl:1: two assistant turns in a row")


def test_no_assistant_turn(tmp_path):
    bad(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}], r"bad.jsonl:1: .*no assistant turn")


def test_conversation_must_start_with_user(tmp_path):
    bad(tmp_path, [{"messages": [{"role": "assistant", "content": "x"}]}], r"must start with a user message")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: byte \d+ of the line is not UTF-8; re-save the file as UTF-8"):
        load_conversations(str(path))


def test_non_utf8_json_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n{"instruction": "q",\n "output": "\xff"}]')
    with pytest.raises(DataError, match=r"bad.json:3: bytes that are not UTF-8"):
        load_conversations(str(path))


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "q", "output": "a"},\n{"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        load_conversations(str(path))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: the dataset is empty"):
        load_conversations(str(tmp_path / "empty.jsonl"))


def test_undetectable_format_explains_options(tmp_path):
    bad(tmp_path, [{"foo": 1}], r"cannot tell the data format from the fields \['foo'\].*columns:")


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_conversations(str(tmp_path / "d.txt"))


def test_error_message_says_how_to_skip(tmp_path):
    bad(tmp_path, [{"instruction": "q"}], r"data.on_bad_record=skip", fmt="alpaca")


def test_skip_counts_every_reason(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        GOOD, "not json", {"instruction": "q"}, {"instruction": "q", "output": ""}, GOOD, [1, 2]])
    res = load_conversations(str(path), on_bad_record="skip")
    assert res.read == 6 and len(res.conversations) == 2
    assert res.skipped == {"malformed JSON": 1, "missing field": 1, "empty field": 1, "not an object": 1}
