"""Generated text parsed back into OpenAI fields (sftlab.data.tool_parsers): each layout on one and two
calls, content, reasoning, malformed and unicode calls; `auto` selection from template sources; the
stream parser against the whole-text parse on random chunkings; and built-in templates' rendered tool-call
turns parsed back to the calls they were rendered from, so training text and server parsing agree."""

import json
import random
import re

import pytest
from conftest import FIXTURES
from transformers.utils.chat_template_utils import render_jinja_template

from sftlab.data.assistant import inline_reasoning, knows_reasoning, parse_tool_calls, split_reasoning, template_message
from sftlab.data.chat_templates import BUILTIN, END_OF_TURN_TOKENS
from sftlab.data.conversation import Message
from sftlab.data.tool_parsers import (
    LAYOUTS,
    Event,
    Parsed,
    StreamParser,
    ToolParser,
    collect,
    layout_for_template,
    parse,
    prompt_opens_reasoning,
    resolve_layout,
    supports_tools,
)
from sftlab.errors import ConfigError

CALL_ID = re.compile(r"call_[0-9a-f]{24}")
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOKYO = '{"name": "get_time", "arguments": {"city": "東京", "note": "Zürich ✓ 🌧"}}'


def calls(parsed: Parsed) -> list[tuple[str, dict]]:
    """(name, arguments) per call, checking each is OpenAI's shape with a JSON-string arguments."""
    out = []
    for c in parsed.tool_calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert isinstance(c["function"]["arguments"], str)
        out.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
    return out


def hermes(*bodies: str) -> str:
    return "".join(f"<tool_call>\n{b}\n</tool_call>" for b in bodies)


# --- hermes ---


def test_hermes_one_call():
    got = parse(hermes(PARIS), "hermes")
    assert got.content is None and got.reasoning is None
    assert calls(got) == [("get_weather", {"city": "Paris"})]
    assert CALL_ID.fullmatch(got.tool_calls[0]["id"])


def test_hermes_two_parallel_calls_after_content():
    got = parse("Let me check both.\n" + hermes(PARIS) + "\n" + hermes(TOKYO), "hermes")
    assert got.content == "Let me check both."
    assert [n for n, _ in calls(got)] == ["get_weather", "get_time"]
    assert len({c["id"] for c in got.tool_calls}) == 2


def test_hermes_reasoning_then_call():
    got = parse("<think>\nThe user wants the weather.\n</think>\n\n" + hermes(PARIS), "hermes")
    assert got.reasoning == "The user wants the weather." and got.content is None
    assert calls(got) == [("get_weather", {"city": "Paris"})]


def test_hermes_text_after_a_call_is_content():
    got = parse(hermes(PARIS) + "\n\nI asked the weather service.", "hermes")
    assert got.content == "I asked the weather service." and len(got.tool_calls) == 1


@pytest.mark.parametrize("body", ['{"name": "get_weather", "arguments": {"city": }', '{"arguments": {}}', "get_weather(city='Paris')",
                                  '{"name": "f", "arguments": [1, 2]}', "[]", "null"])  # fmt: skip
def test_hermes_malformed_block_is_kept_as_content(body):
    text = "Checking.\n" + hermes(body)
    assert parse(text, "hermes") == Parsed(content=text, tool_calls=[], reasoning=None)


def test_hermes_unclosed_block_is_kept_as_content():
    text = "Checking.\n<tool_call>\n" + PARIS  # generation cut off before </tool_call>
    assert parse(text, "hermes") == Parsed(content=text)


def test_hermes_malformed_block_beside_a_good_one_stays_text_alone():
    """A stream has sent the good call before the bad block arrives, so each block stands alone."""
    bad = hermes('{"name": "f", "arguments": {')
    got = parse(hermes(PARIS) + "\n" + bad, "hermes")
    assert calls(got) == [("get_weather", {"city": "Paris"})] and got.content == bad


def test_unicode_arguments_are_written_unescaped():
    got = parse(hermes(TOKYO), "hermes")
    args = got.tool_calls[0]["function"]["arguments"]
    assert "東京" in args and "🌧" in args and "\\u" not in args
    assert json.loads(args) == {"city": "東京", "note": "Zürich ✓ 🌧"}


def test_arguments_given_as_a_json_string_are_decoded_once():
    got = parse(hermes('{"name": "f", "arguments": "{\\"a\\": 1}"}'), "hermes")
    assert got.tool_calls[0]["function"]["arguments"] == '{"a": 1}'


# --- llama3_json ---


def test_llama3_one_call():
    got = parse('{"name": "get_weather", "parameters": {"city": "Paris"}}', "llama3_json")
    assert got.content is None and calls(got) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("sep", ["; ", ";", "\n", " ; \n"])
def test_llama3_two_calls_after_python_tag(sep):
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}' + sep + '{"name": "b", "arguments": {"y": "ü"}}'
    assert calls(parse(text, "llama3_json")) == [("a", {"x": 1}), ("b", {"y": "ü"})]


def test_llama3_reasoning_then_call():
    got = parse('<think>\nUse the tool.\n</think>\n\n{"name": "a", "parameters": {}}', "llama3_json")
    assert got.reasoning == "Use the tool." and got.content is None and calls(got) == [("a", {})]


@pytest.mark.parametrize("text", ['{"answer": 4}', '{"name": "Ada", "age": 36}', "The answer is 4.",
                                  '{"name": "a", "parameters": {"x": }', '{"name": "a", "parameters": {}} and more',
                                  "<|python_tag|>brave_search.call(query='x')", "  "])  # fmt: skip
def test_llama3_what_is_not_calls_stays_content(text):
    assert parse(text, "llama3_json") == Parsed(content=text)


# --- mistral ---


def test_mistral_one_call():
    got = parse(f"[TOOL_CALLS] [{PARIS}]", "mistral")
    assert got.content is None and calls(got) == [("get_weather", {"city": "Paris"})]
    assert CALL_ID.fullmatch(got.tool_calls[0]["id"])


def test_mistral_two_calls_with_ids_after_content():
    """Mistral's templates check a tool result's id against the call's, so the model's own ids are kept."""
    text = ('I will look both up. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}, "id": "Ab3dE6gH9"}, '
            '{"name": "b", "arguments": {}, "id": "Zy8xW7vU6"}]')  # fmt: skip
    got = parse(text, "mistral")
    assert got.content == "I will look both up." and calls(got) == [("a", {"x": 1}), ("b", {})]
    assert [c["id"] for c in got.tool_calls] == ["Ab3dE6gH9", "Zy8xW7vU6"]


def test_mistral_named_format_one_marker_per_call():
    got = parse('[TOOL_CALLS]a[ARGS]{"x": "東京"}[TOOL_CALLS]b[CALL_ID]Ab3dE6gH9[ARGS]{}', "mistral")
    assert calls(got) == [("a", {"x": "東京"}), ("b", {})] and got.tool_calls[1]["id"] == "Ab3dE6gH9"


def test_mistral_reasoning_then_call():
    got = parse(f"<think>Look it up.</think>[TOOL_CALLS] [{PARIS}]", "mistral")
    assert got.reasoning == "Look it up." and got.content is None and len(got.tool_calls) == 1


@pytest.mark.parametrize("text", ['Sure. [TOOL_CALLS] [{"name": "a", "arguments": {]', "[TOOL_CALLS]", "[TOOL_CALLS] [] ",
                                  f"[TOOL_CALLS] [{PARIS}] and some text", "Plain [answer]."])  # fmt: skip
def test_mistral_malformed_calls_are_kept_as_content(text):
    assert parse(text, "mistral") == Parsed(content=text)


# --- reasoning ---


def test_reasoning_the_prompt_opened():
    """DeepSeek-R1's generation prompt ends in <think>: the reply is reasoning up to </think>."""
    prompt = render(BUILTIN["deepseek"], [{"role": "user", "content": "2+2?"}], generation_prompt=True)
    assert prompt_opens_reasoning(prompt)
    got = parse("Two and two.\n</think>\n\n4.", None, in_reasoning=prompt_opens_reasoning(prompt))
    assert got == Parsed(content="4.", reasoning="Two and two.")


def test_a_closed_think_block_in_the_prompt_opens_no_reasoning():
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning(render(BUILTIN["qwen"], [{"role": "user", "content": "hi"}], True))


def test_unclosed_reasoning_is_reasoning_to_the_end():
    assert parse("<think>\nStill thinking about", "hermes") == Parsed(content=None, reasoning="Still thinking about")
    assert parse("Still thinking", "hermes", in_reasoning=True) == Parsed(content=None, reasoning="Still thinking")


def test_empty_think_block_is_no_reasoning():
    assert parse("<think>\n\n</think>\n\nHello.", "hermes") == Parsed(content="Hello.")


def test_reasoning_split_as_training_writes_it():
    text = inline_reasoning("Step one.\nStep two.", "Done.")
    assert split_reasoning({}, text, "t") == ("Step one.\nStep two.", "Done.")
    assert parse(text, None) == Parsed(content="Done.", reasoning="Step one.\nStep two.")


def test_no_layout_parses_no_calls():
    text = "Here: " + hermes(PARIS)
    assert parse(text, None) == Parsed(content=text)


# --- choosing the layout ---

HERMES_SNIPPET = ("{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}"
                  "</tool_call>{% endfor %}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}")  # fmt: skip
LLAMA3_TAG_SNIPPET = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% if m.tool_calls %}"
                      "<|python_tag|>{{ m.tool_calls[0].function | tojson }}{% endif %}{% endfor %}"
                      "{% if tools is not none %}{{ tools | tojson }}{% endif %}")  # fmt: skip
LLAMA3_PARAMS_SNIPPET = ("{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
                         "<|start_header_id|>system<|end_header_id|>{% if tools %}Answer with "
                         '{"name": function name, "parameters": their values}.{% endif %}<|eot_id|>')  # fmt: skip
MISTRAL_SNIPPET = ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}{% for m in messages %}"
                   "{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}"
                   "{% endfor %}")  # fmt: skip


@pytest.mark.parametrize("source, layout", [
    (HERMES_SNIPPET, "hermes"), (LLAMA3_TAG_SNIPPET, "llama3_json"), (LLAMA3_PARAMS_SNIPPET, "llama3_json"),
    (MISTRAL_SNIPPET, "mistral"),
    # transformers' {% generation %} is no plain-Jinja tag: the source is then read without parsing it
    ("{% generation %}{{ m }}{% endgeneration %}{% if tools %}<tool_call>{% endif %}", "hermes"),
])  # fmt: skip
def test_layout_from_template_snippets(source, layout):
    assert supports_tools(source) and layout_for_template(source) == layout


@pytest.mark.parametrize("source", [
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}",
    "{{ 'Write <tool_call> tags; there are no tools.' }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "{% set tools = [] %}{% for m in messages %}[TOOL_CALLS]{{ m.content }}{% endfor %}",
])  # fmt: skip
def test_templates_without_tools_choose_no_layout(source):
    assert not supports_tools(source) and layout_for_template(source) is None


def test_tool_template_in_an_unknown_layout_chooses_none():
    source = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}<|tool_calls|>{% endfor %}"
    assert supports_tools(source) and layout_for_template(source) is None


BUILTIN_LAYOUTS = {"chatml": None, "qwen": "hermes", "llama2": None, "llama3": "llama3_json", "mistral": "mistral",
                   "gemma": None, "phi3": None, "deepseek": None, "alpaca": None}  # fmt: skip


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_templates(name):
    assert set(BUILTIN_LAYOUTS) == set(BUILTIN)
    assert supports_tools(BUILTIN[name]) == (BUILTIN_LAYOUTS[name] is not None)
    assert layout_for_template(BUILTIN[name]) == BUILTIN_LAYOUTS[name]


@pytest.mark.parametrize(
    "name, layout", [("qwen3.jinja", "hermes"), ("gemma2.jinja", None), ("gemma3_parts.jinja", None)]
)
def test_fixture_templates(name, layout):
    assert layout_for_template((FIXTURES / "templates" / name).read_text()) == layout


def test_resolve_layout():
    assert resolve_layout("auto", BUILTIN["llama3"]) == "llama3_json"
    assert resolve_layout("auto", BUILTIN["chatml"]) is None
    assert resolve_layout("mistral", BUILTIN["chatml"]) == "mistral"
    assert resolve_layout("none", BUILTIN["qwen"]) is None and resolve_layout(None, BUILTIN["qwen"]) is None
    with pytest.raises(ConfigError, match="hermes"):
        resolve_layout("pythonic", BUILTIN["qwen"])
    with pytest.raises(ConfigError):
        ToolParser("qwen")


# --- streaming ---


def stream(text: str, layout: str | None, rng: random.Random, in_reasoning: bool = False) -> list[Event]:
    """The text fed in random chunks of 1 to 7 characters."""
    parser, events, i = StreamParser(layout, in_reasoning), [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        events += parser.feed(text[i : i + n])
        i += n
    return events + parser.finish()


def without_ids(p: Parsed) -> tuple:
    return p.content, [(c["type"], c["function"]) for c in p.tool_calls], p.reasoning


CORPUS = [
    "", " ", "Hello.", "  Hello, world.\n\n", "<think>\nA.\n\nB.\n</think>\n\nAnswer.", "<think>\n\n</think>\n\n",
    "Let me check.\n" + hermes(PARIS) + "\n" + hermes(TOKYO), hermes(PARIS) + "\nDone.", "a <tool_call> b",
    "Checking.\n" + hermes('{"name": "f", "arguments": {'), hermes(PARIS) + "\n<tool_call>\n{", "<tool_cal", "x </tool_call>",
    '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}', '{"answer": 4}',
    '  {"name": "a", "parameters": {}}', "<|python", "<|pythonic", f"Sure. [TOOL_CALLS] [{PARIS}, {TOKYO}]",
    '[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}', "[TOOL_CALLS] [{", "a [TOOL b", "[", "<", "</think>x",
    "<think>never closed\n\n", "<think>a</thi", "<think>a\n\n</thinkx\n", "reasoning\n</think>\n\n" + hermes(PARIS),
    "\u00a0\t<think> spaced </think>\u00a0ok", "text\n\n\n   ",
]  # fmt: skip
FRAGMENTS = ["<think>", "</think>", "\n", "\n\n", " ", "Hello", "é東🌧", "<tool_call>", "</tool_call>", PARIS, '{"name": "g"',
             "}", "[TOOL_CALLS]", f"[{PARIS}]", "<|python_tag|>", '{"name": "f", "parameters": {}}', ";", "<tool", "</th",
             "[TOOL", "<|py", "<", "[", "{", 'f[ARGS]{"x": 2}', '{"answer": 4}']  # fmt: skip


@pytest.mark.parametrize("layout", [*LAYOUTS, None])
@pytest.mark.parametrize("in_reasoning", [False, True])
def test_stream_adds_up_to_parse(layout, in_reasoning):
    rng = random.Random(1234)
    texts = CORPUS + ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    for text in texts:
        want = without_ids(parse(text, layout, in_reasoning))
        for _ in range(3):
            got = collect(stream(text, layout, rng, in_reasoning))
            assert without_ids(got) == want, (text, layout, in_reasoning)
            assert all(CALL_ID.fullmatch(c["id"]) for c in got.tool_calls)


def test_stream_holds_back_a_possible_marker_and_sends_a_call_when_its_block_closes():
    parser = StreamParser("hermes")
    assert parser.feed("Checking <tool") == [Event("content", "Checking")]
    assert parser.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Par') == []
    (event,) = parser.feed('is"}}\n</tool_call>')
    assert event.kind == "tool_call" and event.tool_call["function"]["name"] == "get_weather"
    assert parser.feed("\n") == [] and parser.finish() == []


def test_stream_shows_a_false_marker_start_once_it_cannot_be_one():
    parser = StreamParser("hermes")
    assert parser.feed("a <tool") == [Event("content", "a")]
    assert parser.feed("bar") == [Event("content", " <toolbar")]


def test_stream_reasoning_then_content():
    parser = StreamParser("hermes")
    assert parser.feed("<think>\nFirst") == [Event("reasoning", "First")]
    assert parser.feed(" idea.\n</thi") == [Event("reasoning", " idea.")]
    assert parser.feed("nk>\n\nDone") == [Event("content", "Done")]
    assert parser.finish() == []


def test_stream_mistral_and_llama3_calls_come_at_finish():
    mistral = StreamParser("mistral")
    assert mistral.feed("Ok [TOOL") == [Event("content", "Ok")]
    assert mistral.feed(f"_CALLS] [{PARIS}]") == []
    assert [e.kind for e in mistral.finish()] == ["tool_call"]
    llama = StreamParser("llama3_json")
    assert llama.feed("<|py") == [] and llama.feed('thon_tag|>{"name": "a", "parameters": {}}') == []
    assert [e.kind for e in llama.finish()] == ["tool_call"]
    plain = StreamParser("llama3_json")
    assert plain.feed("Hi") == [Event("content", "Hi")] and plain.feed(" there") == [Event("content", " there")]


def test_stream_content_never_shows_marker_pieces():
    rng = random.Random(7)
    text = "Sure.\n" + hermes(PARIS) + "\n" + hermes(TOKYO) + "\nBoth sent."
    for _ in range(20):
        shown = [e.text for e in stream(text, "hermes", rng) if e.kind == "content"]
        assert "".join(shown) == "Sure.Both sent." and not any("<" in s for s in shown)


# --- round trip: the text training renders parses back to its calls ---

TOOLS = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]  # fmt: skip
RAW_CALLS = [json.loads(PARIS), json.loads(TOKYO)]


def render(source: str, messages: list[dict], generation_prompt: bool = False, tools=None) -> str:
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=source,
                                        add_generation_prompt=generation_prompt, bos_token="<s>", eos_token="</s>")  # fmt: skip
    return rendered[0]


def rendered_reply(source: str, reply: Message) -> str:
    """The assistant turn as the template renders it after its prompt, without its end-of-turn token."""
    user = {"role": "user", "content": "Weather in Paris, time in Tokyo?"}
    prompt = render(source, [user], generation_prompt=True, tools=TOOLS)
    full = render(source, [user, template_message(reply, knows_reasoning(source))], tools=TOOLS)
    assert full.startswith(prompt)
    text = full[len(prompt) :].rstrip("\n")
    return next((text.removesuffix(t) for t in END_OF_TURN_TOKENS if text.endswith(t)), text)


ROUND_TRIPS = [  # (template, content, reasoning): llama3 and mistral render no text beside calls
    ("qwen", "Checking both.", None), ("qwen", "Checking both.", "Two cities, two calls."), ("qwen", "", None),
    ("llama3", "", None), ("mistral", "", None), ("qwen3.jinja", "Checking both.", "Two cities, two calls."),
]  # fmt: skip


@pytest.mark.parametrize("name, content, reasoning", ROUND_TRIPS)
@pytest.mark.parametrize("n_calls", [1, 2])
def test_rendered_tool_calls_parse_back(name, content, reasoning, n_calls):
    source = BUILTIN[name] if name in BUILTIN else (FIXTURES / "templates" / name).read_text()
    trained = parse_tool_calls(RAW_CALLS[:n_calls], "round trip")
    text = rendered_reply(source, Message("assistant", content, tool_calls=trained, reasoning=reasoning))
    layout = layout_for_template(source)
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in trained]
    got = parse(text, layout)
    assert calls(got) == want and got.content == (content or None) and got.reasoning == reasoning, text
    assert without_ids(collect(stream(text, layout, random.Random(n_calls)))) == without_ids(got)
