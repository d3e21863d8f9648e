"""A model's generated text parsed back into OpenAI chat fields (content, tool_calls, reasoning) for
`sftlab serve`, whole (`ToolParser.parse`) or as it streams (`StreamParser`).

The layouts carry vLLM's parser names, so a `--tool-call-parser` a user knows means the same here:

    hermes       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, any number of them; the
                 text around them is content (Qwen2.5, Qwen3, Hermes; sftlab's `qwen` template)
    llama3_json  the whole answer is {"name": ..., "parameters": {...}} ("arguments" too), maybe after
                 <|python_tag|>, several separated by ';' or whitespace (Llama 3.1/3.2; `llama3`)
    mistral      content, then [TOOL_CALLS] [{"name": ..., "arguments": {...}, "id"?: ...}, ...], or the
                 newer [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} once per call (Mistral; `mistral`)
    None         no tool calls: only the reasoning is split off (templates without tool support)

Rules every layout shares, so that parse() and StreamParser give the same fields:
- Reasoning is a leading <think>...</think> block, read with assistant.split_reasoning: the layout
  training writes. With `in_reasoning` (the prompt ended in <think>, as DeepSeek-R1's does) the text up
  to </think> is reasoning. A block never closed is reasoning to the end: a generation cut off mid-thought.
- A call block whose JSON is not a tool call stays in the content verbatim, markers included: the
  server never raises on model output and never drops text. Each hermes block stands alone, because a
  stream has already sent the calls before it when a later block turns out malformed.
- Whitespace between content and a call block belongs to the block (the templates write a newline there),
  so a rendered training turn parses back to its own content.
- Empty content or reasoning is None, as OpenAI sends `content: null` beside tool calls.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
import jinja2.meta

from sftlab.data.assistant import THINK_CLOSE, THINK_OPEN, parse_tool_calls, split_reasoning
from sftlab.data.conversation import RecordProblem
from sftlab.errors import ConfigError

LAYOUTS = ("hermes", "llama3_json", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
_MISTRAL_NAMED = re.compile(r"\s*([^\s\[\]{}]+)(?:\[CALL_ID\]\s*([^\s\[\]]+))?\s*\[ARGS\](.*)", re.DOTALL)
_PARAMETERS = re.compile(r"""\\?["']parameters\\?["']""")  # Llama 3's call format, however the template quotes it
_TOOLS_IN_TAG = re.compile(r"\{[{%][^}]*\btools\b")  # fallback for templates plain Jinja cannot parse


@dataclass(frozen=True)
class Parsed:
    """One generated reply as OpenAI's message fields; tool_calls are OpenAI's, arguments a JSON string."""

    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    reasoning: str | None = None


@dataclass(frozen=True)
class Event:
    """A streamed piece: a content or reasoning delta (`text`), or one complete tool call (`tool_call`)."""

    kind: Literal["content", "reasoning", "tool_call"]
    text: str = ""
    tool_call: dict | None = None


class _NotCalls(Exception):
    """A call block's text is not tool calls; its text then stays content."""


# --- choosing a layout ---


def supports_tools(template_source: str) -> bool:
    """Whether the chat template reads the `tools` variable: one that never does drops the schemas."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(template_source))
    except jinja2.TemplateSyntaxError:  # tags plain Jinja lacks, e.g. transformers' {% generation %}
        return bool(_TOOLS_IN_TAG.search(template_source))


def layout_for_template(template_source: str) -> str | None:
    """The layout a tool-calling template writes calls in (what `auto` picks), or None where the template
    has no tool support or writes calls in a layout no parser here reads."""
    if not supports_tools(template_source):
        return None
    if HERMES_OPEN in template_source:
        return "hermes"
    if MISTRAL_CALLS in template_source:
        return "mistral"
    llama3 = "<|start_header_id|>" in template_source and _PARAMETERS.search(template_source)
    if PYTHON_TAG in template_source or llama3:
        return "llama3_json"
    return None


def resolve_layout(name: str | None, template_source: str) -> str | None:
    """A `--tool-call-parser` value as a layout: `auto` reads the template, `none` (or None) parses no calls."""
    if name == "auto":
        return layout_for_template(template_source)
    if name is None or name == "none":
        return None
    if name not in LAYOUTS:
        raise ConfigError(f"tool-call parser {name!r} is not one of auto, none, {', '.join(LAYOUTS)}")
    return name


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves a <think> block open, so the reply starts inside its reasoning."""
    return prompt.rstrip().endswith(THINK_OPEN)


# --- decoding call blocks ---


def new_call_id() -> str:
    """OpenAI's id shape; random, since ids must stay distinct across a whole conversation."""
    return "call_" + secrets.token_hex(12)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _NotCalls from None


def _calls(value: Any) -> list[dict]:
    """OpenAI tool calls from decoded JSON (a call or a list of them), validated by the training side's
    parse_tool_calls so that what the server accepts is what a record may hold."""
    try:
        calls = parse_tool_calls(value, "generated tool call")
    except RecordProblem:
        raise _NotCalls from None
    if not calls:
        raise _NotCalls
    return [_openai(c) for c in calls]


def _openai(call: dict) -> dict:
    """A call as OpenAI sends it; an id the model wrote (Mistral's) is kept: its template checks it."""
    fn = call["function"]
    function = {"name": fn["name"], "arguments": json.dumps(fn["arguments"], ensure_ascii=False)}
    return {"id": call.get("id") or new_call_id(), "type": "function", "function": function}


def _attempt(decode, text: str) -> list[dict] | None:
    try:
        return decode(text)
    except _NotCalls:
        return None


def _hermes_block(block: str) -> list[dict]:
    return _calls(_loads(block))


def _llama3_calls(body: str) -> list[dict]:
    """Calls from JSON objects separated by ';' or whitespace; the whole body must be calls, so a JSON
    answer that is not one (`{"answer": 4}`) stays content."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    while (pos := _skip(body, pos, " \t\r\n;")) < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError):
            raise _NotCalls from None
        key = next((k for k in ("parameters", "arguments") if isinstance(obj, dict) and k in obj), None)
        if key is None or not isinstance(obj.get("name"), str):
            raise _NotCalls
        found.append({"name": obj["name"], "arguments": obj[key]})
    return _calls(found)


def _mistral_calls(tail: str) -> list[dict]:
    """Calls from text starting at [TOOL_CALLS]: a JSON list (or object) after each marker, or the newer
    name[CALL_ID]id[ARGS]{...} form."""
    found = []
    for segment in tail.split(MISTRAL_CALLS)[1:]:
        named = _MISTRAL_NAMED.fullmatch(segment)
        if named is None:
            value = _loads(segment)
            found += value if isinstance(value, list) else [value]
        else:
            call = {"name": named[1], "arguments": _loads(named[3])}
            found.append({**call, "id": named[2]} if named[2] else call)
    return _calls(found)


def _skip(text: str, pos: int, chars: str | None = None) -> int:
    return len(text) - len(text[pos:].lstrip(chars))


# --- whole-text parsing ---


def _split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """(reasoning, the rest): the training side's <think> layout, plus a block the prompt opened or that
    generation never closed."""
    if in_reasoning:
        text = THINK_OPEN + text
    reasoning, rest = split_reasoning({}, text, "generated text")
    if reasoning is None and text.lstrip().startswith(THINK_OPEN):
        return text.lstrip()[len(THINK_OPEN) :].strip("\n"), ""
    return reasoning, rest


def _split_hermes(rest: str) -> tuple[str, list[dict]]:
    pieces, calls, pos = [], [], 0
    while (start := rest.find(HERMES_OPEN, pos)) >= 0:
        end = rest.find(HERMES_CLOSE, start + len(HERMES_OPEN))
        if end < 0:  # cut off inside the block: it stays text
            break
        after = end + len(HERMES_CLOSE)
        found = _attempt(_hermes_block, rest[start + len(HERMES_OPEN) : end])
        if found is None:
            pieces.append(rest[pos:after])
            pos = after
        else:
            pieces.append(rest[pos:start].rstrip())
            calls += found
            pos = _skip(rest, after)
    pieces.append(rest[pos:])
    return "".join(pieces), calls


def _split_llama3(rest: str) -> tuple[str, list[dict]]:
    body = rest.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :]
    elif not body.startswith("{"):
        return rest, []
    found = _attempt(_llama3_calls, body)
    return ("", found) if found else (rest, [])


def _split_mistral(rest: str) -> tuple[str, list[dict]]:
    start = rest.find(MISTRAL_CALLS)
    found = _attempt(_mistral_calls, rest[start:]) if start >= 0 else None
    return (rest[:start].rstrip(), found) if found else (rest, [])


_SPLITS = {"hermes": _split_hermes, "llama3_json": _split_llama3, "mistral": _split_mistral, None: lambda r: (r, [])}


class ToolParser:
    """One layout's parser; `parse` reads a whole reply, `stream` starts an incremental one."""

    def __init__(self, layout: str | None):
        if layout not in _SPLITS:
            raise ConfigError(f"tool-call layout {layout!r} is not one of {', '.join(LAYOUTS)} (or None)")
        self.layout = layout

    def parse(self, text: str, in_reasoning: bool = False) -> Parsed:
        reasoning, rest = _split_reasoning(text, in_reasoning)
        content, calls = _SPLITS[self.layout](rest)
        return Parsed(content or None, calls, reasoning or None)

    def stream(self, in_reasoning: bool = False) -> StreamParser:
        return StreamParser(self.layout, in_reasoning)


def parse(text: str, layout: str | None, in_reasoning: bool = False) -> Parsed:
    """One reply parsed whole; `in_reasoning`: the prompt left a <think> block open (prompt_opens_reasoning)."""
    return ToolParser(layout).parse(text, in_reasoning)


def collect(events: list[Event]) -> Parsed:
    """The fields a stream's events add up to (equal to parse() on the whole text, ids aside)."""
    content = "".join(e.text for e in events if e.kind == "content")
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    calls = [e.tool_call for e in events if e.kind == "tool_call"]
    return Parsed(content or None, calls, reasoning or None)


# --- streaming ---


def _partial(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could be the start of `marker` (to hold back)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _say(out: list[Event], kind: Literal["content", "reasoning"], text: str) -> None:
    if text:
        out.append(Event(kind, text))


def _said_calls(out: list[Event], calls: list[dict]) -> None:
    out.extend(Event("tool_call", tool_call=c) for c in calls)


class _Watch:
    """Content that may hold `marker`: shows what cannot be part of it, holds back a possible partial
    marker and the whitespace before it (that whitespace goes with a call block if one follows).
    Each feed scans only the held-back partial marker and the new text."""

    def __init__(self, marker: str):
        self.marker = marker
        self.partial = ""
        self.spaces: list[str] = []

    def feed(self, text: str) -> tuple[str, str | None, str]:
        """(text to show, the whitespace before the marker or None while it has not come, text after it)"""
        window = self.partial + text
        at = window.find(self.marker)
        if at < 0:
            keep = _partial(window, self.marker)
            self.partial = window[len(window) - keep :]
            return self._release(window[: len(window) - keep]), None, ""
        shown, spaces = self._release(window[:at]), "".join(self.spaces)
        self.partial, self.spaces = "", []
        return shown, spaces, window[at + len(self.marker) :]

    def _release(self, text: str) -> str:
        head = text.rstrip()
        shown = "".join(self.spaces) + head if head else ""
        if head:
            self.spaces = []
        if len(text) > len(head):
            self.spaces.append(text[len(head) :])
        return shown

    def finish(self) -> str:
        return "".join(self.spaces) + self.partial


class _Until:
    """A block's text up to its closing marker. Each feed scans the new text and the few characters before
    it that could start the marker, so a long block costs O(delta) per feed."""

    def __init__(self, marker: str):
        self.marker = marker
        self.parts: list[str] = []
        self.tail = ""
        self.body = ""

    def feed(self, text: str) -> str | None:
        """The text after the marker once it has come (the block's text is then `body`), else None."""
        window = self.tail + text
        at = window.find(self.marker)
        if at < 0:
            self.parts.append(text)
            self.tail = window[-(len(self.marker) - 1) :]
            return None
        whole = "".join(self.parts) + text
        cut = len(whole) - len(window) + at
        self.body = whole[:cut]
        return whole[cut + len(self.marker) :]

    def text(self) -> str:
        return "".join(self.parts)


class _PlainStream:
    def feed(self, text: str) -> list[Event]:
        return [Event("content", text)] if text else []

    def finish(self) -> list[Event]:
        return []


class _HermesStream:
    """Content shown as it comes; each <tool_call> block held until it closes, then one call (or, when
    it is not a call, its text as content)."""

    def __init__(self):
        self._watch = _Watch(HERMES_OPEN)
        self._block: _Until | None = None
        self._spaces = ""  # before the open block: content again if the block is not a call
        self._after_call = False  # whitespace right after a call block belongs to it

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        while text:
            if self._block is not None:
                after = self._block.feed(text)
                if after is None:
                    break
                self._close(self._block.body, out)
                text = after
            elif self._after_call:
                text = text.lstrip()
                self._after_call = not text
            else:
                shown, spaces, text = self._watch.feed(text)
                _say(out, "content", shown)
                if spaces is not None:
                    self._spaces, self._block = spaces, _Until(HERMES_CLOSE)
        return out

    def _close(self, body: str, out: list[Event]) -> None:
        self._block = None
        found = _attempt(_hermes_block, body)
        if found is None:
            _say(out, "content", self._spaces + HERMES_OPEN + body + HERMES_CLOSE)
        else:
            _said_calls(out, found)
            self._after_call = True

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._block is not None:
            _say(out, "content", self._spaces + HERMES_OPEN + self._block.text())
        elif not self._after_call:
            _say(out, "content", self._watch.finish())
        return out


class _MistralStream:
    """Content shown until [TOOL_CALLS]; from there everything is held and decoded at the end (the
    format has no closing marker)."""

    def __init__(self):
        self._watch = _Watch(MISTRAL_CALLS)
        self._tail: list[str] | None = None
        self._spaces = ""

    def feed(self, text: str) -> list[Event]:
        if self._tail is not None:
            self._tail.append(text)
            return []
        shown, spaces, after = self._watch.feed(text)
        if spaces is not None:
            self._spaces, self._tail = spaces, [MISTRAL_CALLS, after]
        return [Event("content", shown)] if shown else []

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._tail is None:
            _say(out, "content", self._watch.finish())
            return out
        tail = "".join(self._tail)
        found = _attempt(_mistral_calls, tail)
        if found is None:
            _say(out, "content", self._spaces + tail)
        else:
            _said_calls(out, found)
        return out


class _Llama3Stream:
    """The first characters decide: a reply opening with '{' or <|python_tag|> is held and decoded at the
    end (calls, or content if it is not calls); any other reply is content shown as it comes."""

    def __init__(self):
        self._spaces: list[str] = []
        self._lead = ""  # the reply's first non-space characters while they may still open <|python_tag|>
        self._held: list[str] | None = None
        self._shown = False

    def feed(self, text: str) -> list[Event]:
        if self._shown:
            return [Event("content", text)] if text else []
        if self._held is not None:
            self._held.append(text)
            return []
        if not self._lead:
            stripped = text.lstrip()
            self._spaces.append(text[: len(text) - len(stripped)])
            text = stripped
        lead = self._lead + text
        if lead.startswith(("{", PYTHON_TAG)):
            self._held = [*self._spaces, lead]
        elif lead and not PYTHON_TAG.startswith(lead):
            self._shown = True
            return [Event("content", "".join(self._spaces) + lead)]
        else:
            self._lead = lead
        return []

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._held is None:
            _say(out, "content", "" if self._shown else "".join(self._spaces) + self._lead)
            return out
        content, calls = _split_llama3("".join(self._held))
        _say(out, "content", content)
        _said_calls(out, calls)
        return out


_STREAMS = {"hermes": _HermesStream, "llama3_json": _Llama3Stream, "mistral": _MistralStream, None: _PlainStream}


class StreamParser:
    """Incremental parse of a reply as tokens decode: `feed` each delta, then `finish`. The events add up
    (collect()) to exactly what ToolParser.parse gives on the whole text; content is shown as soon as it
    cannot be the start of a marker, a hermes call as soon as its block closes, llama3_json and mistral
    calls at finish. Work per feed is bounded by the delta and the open block, never the whole reply."""

    def __init__(self, layout: str | None, in_reasoning: bool = False):
        self._body = _STREAMS[ToolParser(layout).layout]()
        self._phase = "think" if in_reasoning else "start"  # start -> think -> after -> body
        self._spaces: list[str] = []  # start: whitespace before a possible <think>
        self._lead = ""  # start: what may still be <think>
        self._held = ""  # think: a possible start of </think>
        self._newlines = 0  # think: newlines held back, dropped if </think> follows them
        self._thinking = False  # think: reasoning text was shown (later leading newlines are kept)

    def feed(self, delta: str) -> list[Event]:
        out: list[Event] = []
        text = delta
        while text:
            if self._phase == "start":
                text = self._start(text)
            elif self._phase == "think":
                text = self._think(text, out)
            elif self._phase == "after":  # split_reasoning drops the whitespace after </think>
                text = text.lstrip()
                self._phase = "body" if text else "after"
            else:
                out += self._body.feed(text)
                text = ""
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        if self._phase == "start":
            out += self._body.feed("".join(self._spaces) + self._lead)
        elif self._phase == "think":  # never closed: reasoning to the end
            self._reason(self._held, out, closed=True)
        return out + self._body.finish()

    def _start(self, text: str) -> str:
        """Hold leading whitespace and a possible <think>; return the text for the next phase."""
        if not self._lead:
            stripped = text.lstrip()
            self._spaces.append(text[: len(text) - len(stripped)])
            text = stripped
        lead = self._lead + text
        if lead.startswith(THINK_OPEN):
            self._phase, self._lead, self._spaces = "think", "", []
            return lead[len(THINK_OPEN) :]
        if THINK_OPEN.startswith(lead):
            self._lead = lead
            return ""
        self._phase = "body"
        return "".join(self._spaces) + lead

    def _think(self, text: str, out: list[Event]) -> str:
        window = self._held + text
        end = window.find(THINK_CLOSE)
        if end >= 0:
            self._held, self._phase = "", "after"
            self._reason(window[:end], out, closed=True)
            return window[end + len(THINK_CLOSE) :]
        keep = _partial(window, THINK_CLOSE)
        self._held = window[len(window) - keep :]
        self._reason(window[: len(window) - keep], out, closed=False)
        return ""

    def _reason(self, text: str, out: list[Event], closed: bool) -> None:
        """Show reasoning text without the newlines split_reasoning strips at either end of the block."""
        if not self._thinking:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        if body:
            _say(out, "reasoning", "\n" * self._newlines + body)
            self._thinking, self._newlines = True, 0
        self._newlines = 0 if closed else self._newlines + len(text) - len(body)
