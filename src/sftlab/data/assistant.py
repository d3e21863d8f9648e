"""What the assistant writes besides text, and the tool results it reads: one module owns their layouts.

Records are parsed into the Conversation's fields here and rendered for a chat template here, so
the training text and the text a server parses back cannot drift apart.

    tools        function schemas offered to the model, OpenAI's {type: function, function: {name, ...}}
                 (a flat {name, description, parameters}, as LLaMA-Factory writes it, is wrapped so)
    tool_calls   [{id?, type: function, function: {name, arguments}}]; arguments become a mapping: the
                 templates serialise them themselves (`| tojson`), so a JSON string would be encoded twice
    reasoning    reasoning_content / reasoning on an assistant turn, or <think>...</think> opening its
                 content: one field. A template that reads reasoning_content renders it; for any other
                 it is written before the content as <think>\\n...\\n</think>\\n\\n, the layout reasoning
                 models generate.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sftlab.data.conversation import Conversation, Message, RecordProblem

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)
REASONING_FIELD = "reasoning_content"  # the field name templates read (Qwen3 and QwQ style)


def _json(value: Any, where: str, kind: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordProblem(kind, f"{where} is not valid JSON ({e.msg} at column {e.colno}); fix it") from None


def _objects(value: Any, where: str, kind: str, what: str) -> list[dict]:
    """A list of objects from a list, one object, or a JSON string of either ([] for none)."""
    if value is None or value == "" or value == []:
        return []
    value = _json(value, where, kind)
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RecordProblem(kind, f"{where} must be a list of {what}")
    return value


def parse_tools(value: Any, where: str) -> tuple[dict, ...]:
    """Function schemas from a list, one schema, or a JSON string of either."""
    tools = []
    for j, t in enumerate(_objects(value, where, "bad tools", "function schemas")):
        schema = t if isinstance(t.get("function"), dict) else {"type": "function", "function": t}
        if not isinstance(schema["function"].get("name"), str) or not schema["function"]["name"]:
            raise RecordProblem("bad tools", f"{where}[{j}] names no function (expected function.name)")
        tools.append({"type": "function", **schema})
    return tuple(tools)


def parse_tool_calls(value: Any, where: str) -> tuple[dict, ...]:
    """OpenAI tool calls (or flat {name, arguments} calls) with their arguments as a mapping."""
    calls = []
    for j, call in enumerate(_objects(value, where, "bad tool call", "tool calls")):
        fn = call["function"] if isinstance(call.get("function"), dict) else call
        at = f"{where}[{j}]" + (".function" if fn is not call else "")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordProblem("bad tool call", f"{at}.name is missing; every tool call names its function")
        args = _json(fn.get("arguments", {}), f"{at}.arguments", "bad tool call")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RecordProblem("bad tool call", f"{at}.arguments must be a JSON object, got {type(args).__name__}")
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            out = {"id": str(call["id"]), **out}
        calls.append(out)
    return tuple(calls)


def split_reasoning(turn: dict, content: str, where: str) -> tuple[str | None, str]:
    """(reasoning, content): from reasoning_content / reasoning, or a <think> block opening the content."""
    field = turn.get(REASONING_FIELD, turn.get("reasoning"))
    if field is not None and not isinstance(field, str):
        raise RecordProblem("bad field type", f"{where}.{REASONING_FIELD} must be text, got {type(field).__name__}")
    match = _THINK.match(content)
    if field and match:
        raise RecordProblem("reasoning twice", f"{where} has both {REASONING_FIELD} and a <think> block; keep one")
    if field:
        return field, content
    if match:
        return match.group(1).strip("\n"), content[match.end() :]
    return None, content


def inline_reasoning(reasoning: str, content: str) -> str:
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}"


def knows_reasoning(template_source: str) -> bool:
    """Whether a template renders the reasoning field itself (else sftlab writes it into the content)."""
    return REASONING_FIELD in template_source


def template_message(m: Message, reasoning_field: bool, parts: bool = False) -> dict:
    """The message as chat templates take it; `parts`: content as a list of text parts."""
    content = m.content
    d: dict = {"role": m.role}
    if m.reasoning is not None and reasoning_field:
        d[REASONING_FIELD] = m.reasoning
    elif m.reasoning is not None:
        content = inline_reasoning(m.reasoning, content)
    d["content"] = [{"type": "text", "text": content}] if parts else content
    if m.tool_calls:
        d["tool_calls"] = [json.loads(json.dumps(c)) for c in m.tool_calls]  # JSON types only
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d


def lost_parts(conv: Conversation, rendered: str) -> list[str]:
    """What of the conversation's tool calls, tool results and tool schemas a rendering left out."""
    lost = []
    for j, m in enumerate(conv.messages):
        for call in m.tool_calls:
            names = [call["function"]["name"], *call["function"]["arguments"]]
            if not all(_shown(str(n), rendered) for n in names):
                lost.append(f"message {j}'s tool call {call['function']['name']!r}")
        if m.role == "tool" and not _shown(m.content.strip(), rendered):
            lost.append(f"message {j}'s tool result")
    for tool in conv.tools:
        if not _shown(tool["function"]["name"], rendered):
            lost.append(f"tool schema {tool['function']['name']!r}")
    return lost


def _shown(text: str, rendered: str) -> bool:
    """Whether `text` is in the rendering as it is or as a JSON string (templates that `tojson` it)."""
    return text in rendered or json.dumps(text)[1:-1] in rendered or json.dumps(text, ensure_ascii=False)[1:-1] in rendered
