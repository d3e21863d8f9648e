"""Tool calls, tool results and reasoning read from every layout into the Conversation, never dropped
(docs/correctness.md rule 8), and the records that cannot be used named with their field."""

import json

import pytest
from conftest import FIXTURES, write_jsonl

from sftlab.data.assistant import parse_tool_calls, parse_tools, split_reasoning
from sftlab.data.formats import RecordProblem, load_conversations
from sftlab.errors import DataError

SCHEMA = {"name": "get_weather", "parameters": {"type": "object"}}


def test_openai_tool_records_keep_calls_results_schemas_and_reasoning():
    first, second = load_conversations(str(FIXTURES / "tools_openai.jsonl")).conversations
    call = first.messages[1]
    assert (call.role, call.content) == ("assistant", "")  # content null is a tool-calling turn
    assert call.tool_calls == ({"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},)  # fmt: skip
    assert (first.messages[2].role, first.messages[2].tool_call_id) == ("tool", "call_1")
    assert [t["function"]["name"] for t in first.tools] == ["get_weather"]
    assert second.tools == first.tools  # tools given as a JSON string
    assert second.messages[2].reasoning == "The user wants Rome's weather."


def test_sharegpt_function_layout_and_tags(tmp_path):
    [c] = load_conversations(str(FIXTURES / "tools_sharegpt.json")).conversations
    assert [m.role for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1].tool_calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert c.tools[0] == {"type": "function", "function": {**c.tools[0]["function"]}}  # flat schema wrapped
    renamed = {"conversations": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "yo"}]}
    path = write_jsonl(tmp_path / "tags.jsonl", [renamed])
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    [c] = load_conversations(str(path), tags=tags).conversations
    assert [(m.role, m.content) for m in c.messages] == [("user", "hi"), ("assistant", "yo")]


def test_reasoning_fields_and_think_blocks_are_one_field(tmp_path):
    convs = load_conversations(str(FIXTURES / "reasoning.jsonl")).conversations
    assert [m.reasoning for m in convs[0].messages] == [None, "Two plus two is four."]
    assert (convs[1].messages[1].reasoning, convs[1].messages[1].content) == ("Three plus three is six.", "6.")
    assert convs[2].messages[3].reasoning == "Five and five." and convs[2].messages[1].train is False


def test_dataset_tools_apply_where_a_record_names_none(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])  # fmt: skip
    [c] = load_conversations(str(path), tools=json.dumps([SCHEMA])).conversations
    assert c.tools[0]["function"]["name"] == "get_weather"
    with pytest.raises(DataError, match=r"d.jsonl: the dataset's tools is not valid JSON"):
        load_conversations(str(path), tools="[{")


@pytest.mark.parametrize("turn, match", [
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]},
     r"messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     r"messages\[1\].tool_calls\[0\].function.name is missing"),
    ({"role": "assistant", "content": "", "tool_calls": []}, r"messages\[1\].content is empty"),
    ({"role": "assistant", "content": None}, r"messages\[1\].content is missing"),
    ({"role": "assistant", "content": "a", "weight": 0.5}, r"messages\[1\].weight is 0.5"),
    ({"role": "assistant", "content": "<think>x</think>a", "reasoning_content": "y"},
     r"messages\[1\] has both reasoning_content and a <think>"),
])  # fmt: skip
def test_bad_tool_and_reasoning_fields_name_the_field(tmp_path, turn, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}, turn]}])
    with pytest.raises(DataError, match=rf"bad.jsonl:1: {match}"):
        load_conversations(str(path))


def test_a_tool_result_needs_a_call_before_it(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "tool", "content": "r"},
                                                            {"role": "assistant", "content": "a"}]}])  # fmt: skip
    with pytest.raises(DataError, match="tool result with no tool call before it"):
        load_conversations(str(path))


def test_parsers_on_their_own():
    assert parse_tools(None, "tools") == () and parse_tool_calls([], "c") == ()
    assert parse_tool_calls({"name": "f", "arguments": None}, "c")[0]["function"]["arguments"] == {}
    with pytest.raises(RecordProblem, match=r"c\[0\].arguments must be a JSON object"):
        parse_tool_calls([{"name": "f", "arguments": "[1]"}], "c")
    assert split_reasoning({}, "  <think>\nwhy\n</think>\n\nanswer", "m") == ("why", "answer")
    assert split_reasoning({"reasoning": "why"}, "answer", "m") == ("why", "answer")
    assert split_reasoning({}, "no block <think>here</think>", "m") == (None, "no block <think>here</think>")
