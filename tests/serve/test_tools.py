"""Tool calls end to end: a tiny model trained by sftlab on a tool-calling conversation (the `qwen`
template, hermes layout) served by `sftlab serve` and driven by the official client: calls parsed back,
streamed, answered after the tool result; forced calls decoded under the function's schema."""

import json

import pytest
from conftest import tiny_config, write_jsonl
from helpers import live_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
USER = {"role": "user", "content": "Weather in Paris?"}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'}
ANSWER = "It is 20 degrees in Paris."


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """The tiny model overfit on one tool-calling conversation, served with its training template."""
    from openai import OpenAI

    from sftlab.loop.train import train
    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    tmp = tmp_path_factory.mktemp("tools")
    record = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT,
                           {"role": "assistant", "content": ANSWER}], "tools": TOOLS}  # fmt: skip
    data = write_jsonl(tmp / "tools.jsonl", [record] * 8)
    cfg = tiny_config(tiny_model_dir, tmp / "run", "train.method=full", "data.template=qwen", "train.lr=2e-2",
                      "train.max_steps=80", "data.max_length=512", data=data)  # fmt: skip
    train(cfg, say=lambda *a, **k: None)
    engine = Engine(load_served(str(tmp / "run")), max_batch=4)
    url, stop = live_server(create_app(engine, Limits(max_tokens=64), None, grace_s=2))
    yield OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), engine.served.ids[0], url
    stop()


def test_a_tool_call_comes_back_as_openai_tool_calls_and_the_loop_completes(served):
    client, model, _ = served
    out = client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, temperature=0, max_tokens=48)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content, choice.message
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'}]  # fmt: skip
    final = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=48)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content == ANSWER


def test_streamed_tool_calls_add_up_to_the_same_call(served):
    client, model, _ = served
    stream = client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, temperature=0, max_tokens=48,
                                            stream=True)  # fmt: skip
    calls, reasons, content = {}, [], ""
    for event in stream:
        delta = event.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        reasons.append(event.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and not content.strip()
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]


def test_a_named_or_required_tool_choice_is_decoded_under_the_schema(served):
    client, model, _ = served
    ask = [{"role": "user", "content": "something unrelated entirely"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice_ in (named, "required"):
        for seed in range(2):
            out = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice=choice_,
                                                 parallel_tool_calls=False, temperature=1.0, seed=seed,
                                                 max_tokens=48)  # fmt: skip
            assert out.choices[0].finish_reason == "tool_calls", out.choices[0]
            [call] = out.choices[0].message.tool_calls
            args = json.loads(call.function.arguments)
            assert call.function.name == "get_weather" and set(args) == {"city"} and isinstance(args["city"], str)
    plain = client.chat.completions.create(model=model, messages=[USER], tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=48)  # fmt: skip
    assert plain.choices[0].message.tool_calls is None


def test_tools_on_a_template_without_tool_support_and_bad_tool_choices_are_400(served, lively_model_dir):
    import httpx

    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Api, ApiError, ChatRequest
    from sftlab.serve.engine import Engine

    _, model, url = served
    bad = {"type": "function", "function": {"name": "nope"}}
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": [USER], "tools": TOOLS,
                                                        "tool_choice": bad}, timeout=30)  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    engine = Engine(load_served(str(lively_model_dir)))
    try:
        with pytest.raises(ApiError, match="renders no tools") as err:
            Api(engine).prepare_chat(ChatRequest(model=engine.served.ids[0], messages=[USER], tools=TOOLS))
        assert err.value.param == "tools"
    finally:
        engine.shutdown(2)


def test_required_allows_parallel_calls_unless_told_not_to():
    from sftlab.serve.tools import plan

    template = "{% for t in tools %}{{ t }}{% endfor %}<tool_call>"
    many = plan(TOOLS, "required", True, template, "auto").schema
    one = plan(TOOLS, "required", False, template, "auto").schema
    assert many["type"] == "array" and many["minItems"] == 1 and "maxItems" not in many and one["maxItems"] == 1
    assert plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, True, template, "auto").schema == \
        TOOLS[0]["function"]["parameters"]


def test_reasoning_comes_back_as_reasoning_content_where_the_template_has_it():
    from sftlab.serve.tools import Streamer, plan, reply

    thinking = plan(None, None, True, "{{ message.reasoning_content }}", "auto")
    text = "<think>\nthe user greets\n</think>\n\nHello there."
    message, reason = reply(thinking, text, "stop")
    assert message == {"role": "assistant", "content": "Hello there.", "reasoning_content": "the user greets"}
    streamer, deltas = Streamer(thinking), []
    for piece in (text[:5], text[5:17], text[17:]):
        deltas += streamer.feed(piece)
    deltas += streamer.finish("stop")[0]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "the user greets"
    assert "".join(d.get("content", "") for d in deltas) == "Hello there."
    plain = plan(None, None, True, "{{ messages }}", "auto")  # no reasoning in the template: the text as it is
    assert reply(plain, text, "stop")[0] == {"role": "assistant", "content": text}
