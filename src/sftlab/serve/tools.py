"""Tool calling and reasoning for chat requests: what the template renders, and the reply read back.

    plan()            `tools`, `tool_choice`, `parallel_tool_calls` against the served template: the tools to
                      render, the layout to parse (data.tool_parsers, `--tool-call-parser`), and for
                      `required` or a named function the JSON schema the answer is decoded under
    template_messages()  OpenAI request messages (tool results, assistant tool calls) as templates take them,
                      through the training side's data.assistant layouts
    reply()           the whole answer as an OpenAI message and finish reason
    Streamer          the same, a delta at a time, for server-sent events

`required` and a named tool_choice are decoded under a JSON schema of the call (as vLLM does): the model
writes the call's JSON, not its template's call markers, and the answer is always a valid call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sftlab.data import tool_parsers as tp
from sftlab.data.assistant import REASONING_FIELD, knows_reasoning, parse_tool_calls, parse_tools
from sftlab.data.conversation import RecordProblem


class ToolError(ValueError):
    """A request the tools support cannot honour; `param` names the field (the server answers 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Plan:
    tools: list[dict] | None  # rendered by the template (None: no tools)
    layout: str | None  # data.tool_parsers layout the reply is read with (None: reasoning only)
    reasoning: bool  # split <think> reasoning off into reasoning_content
    forced: str | None = None  # "required" or a function name: the reply is the call's JSON
    schema: dict | None = None  # what a forced reply is decoded under

    @property
    def keep_special(self) -> bool:
        """Decode with special tokens: [TOOL_CALLS] and <|python_tag|> are special tokens in their vocabularies."""
        return self.tools is not None and self.forced is None


def plan(tools, tool_choice, parallel: bool, template: str, parser: str) -> Plan:
    """The request's tool handling on a model whose chat template source is `template`."""
    reasoning = knows_reasoning(template) or tp.THINK_OPEN in template
    if not tools or tool_choice == "none":
        if tool_choice not in (None, "none", "auto") and not tools:
            raise ToolError("tool_choice: names a tool but the request sends no tools", "tool_choice")
        return Plan(None, None, reasoning)
    try:
        schemas = [t["function"] for t in parse_tools(tools, "tools")]
    except RecordProblem as e:
        raise ToolError(str(e), "tools") from None
    if not tp.supports_tools(template):
        raise ToolError("tools: this model's chat template renders no tools (it never reads `tools`); train with a "
                        "template that does, e.g. data.template=qwen or llama3", "tools")  # fmt: skip
    layout = tp.resolve_layout(parser, template)
    forced = _forced(tool_choice, schemas)
    if forced is None and layout is None:
        raise ToolError("tools: no parser reads this template's tool-call layout; start the server with "
                        "--tool-call-parser hermes|llama3_json|mistral", "tools")  # fmt: skip
    schema = _call_schema(forced, schemas, parallel) if forced else None
    return Plan([{"type": "function", "function": s} for s in schemas], layout, reasoning, forced, schema)


def _forced(tool_choice, schemas: list[dict]) -> str | None:
    if tool_choice in (None, "auto"):
        return None
    if tool_choice == "required":
        return "required"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice: none, auto, required or {type: function, function: {name}}", "tool_choice")
    if name not in {s["name"] for s in schemas}:
        raise ToolError(f"tool_choice: {name!r} is not one of the request's tools", "tool_choice")
    return name


def _parameters(schema: dict) -> dict:
    return schema.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(forced: str, schemas: list[dict], parallel: bool) -> dict:
    """A named function: its parameters. required: a list of {name, parameters} calls, one when not parallel."""
    if forced != "required":
        return _parameters(next(s for s in schemas if s["name"] == forced))
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": s["name"]}, "parameters": _parameters(s)},
                      "required": ["name", "parameters"], "additionalProperties": False} for s in schemas]}  # fmt: skip
    return {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def template_messages(messages: list) -> list[dict]:
    """Request messages (pydantic ChatMessage) as the chat templates take them: assistant tool calls with
    their arguments as mappings (templates serialise them), tool results with their call id."""
    out = []
    for i, m in enumerate(messages):
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            try:
                d["tool_calls"] = [json.loads(json.dumps(c)) for c in parse_tool_calls(m.tool_calls, f"messages.{i}")]
            except RecordProblem as e:
                raise ToolError(str(e), f"messages.{i}.tool_calls") from None
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        if m.reasoning_content is not None:
            d[REASONING_FIELD] = m.reasoning_content
        out.append(d)
    return out


def _forced_calls(plan_: Plan, text: str) -> list[dict] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None  # cut by max_tokens
    if plan_.forced != "required":
        return [_call(plan_.forced, value)]
    return [_call(c["name"], c["parameters"]) for c in value]


def _call(name: str, arguments) -> dict:
    return {"id": tp.new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


def reply(plan_: Plan, text: str, reason: str, in_reasoning: bool = False) -> tuple[dict, str]:
    """The OpenAI message for a whole reply, and its finish reason (tool_calls when it called any)."""
    if plan_.forced is not None:
        calls = _forced_calls(plan_, text)
        if calls is None:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    if plan_.layout is None and not plan_.reasoning:
        return {"role": "assistant", "content": text}, reason
    parsed = tp.parse(text, plan_.layout, in_reasoning)
    message = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning is not None:
        message[REASONING_FIELD] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
        return message, "tool_calls"
    if message["content"] is None and parsed.reasoning is None:
        message["content"] = ""
    return message, reason


class Streamer:
    """One choice's streamed deltas: content, reasoning_content and tool-call deltas (each call whole,
    once its block closes), and the finish reason at the end."""

    def __init__(self, plan_: Plan, in_reasoning: bool = False):
        self.plan, self.calls, self.text = plan_, 0, ""
        plain = plan_.forced is None and plan_.layout is None and not plan_.reasoning
        self.parser = None if plain or plan_.forced else tp.StreamParser(plan_.layout, in_reasoning)

    def feed(self, text: str) -> list[dict]:
        if self.plan.forced is not None:
            self.text += text  # the call's JSON: sent whole at the end
            return []
        if self.parser is None:
            return [{"content": text}] if text else []
        return [self._delta(e) for e in self.parser.feed(text)]

    def finish(self, reason: str) -> tuple[list[dict], str]:
        if self.plan.forced is not None:
            message, reason = reply(self.plan, self.text, reason)
            calls = message.get("tool_calls")
            if not calls:
                return [{"content": self.text}], reason
            return [self._call_delta(c) for c in calls], reason
        deltas = [self._delta(e) for e in self.parser.finish()] if self.parser else []
        return deltas, "tool_calls" if self.calls else reason

    def _delta(self, event: tp.Event) -> dict:
        if event.kind == "tool_call":
            return self._call_delta(event.tool_call)
        return {REASONING_FIELD if event.kind == "reasoning" else "content": event.text}

    def _call_delta(self, call: dict) -> dict:
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, **call}]}
