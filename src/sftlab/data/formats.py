"""Instruction files of any common layout -> one internal `Conversation` type.

Readers keep the origin of every record (file and line, or record/row number) so that any
problem found later is reported where the user can fix it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sftlab.data.assistant import parse_tool_calls, parse_tools, split_reasoning
from sftlab.data.conversation import ROLES, Conversation, Message, RecordProblem
from sftlab.errors import DataError

__all__ = ["ROLES", "Conversation", "Message", "RecordProblem", "load_conversations", "load_field_records"]

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
    "bard": "assistant", "bot": "assistant",
    "tool": "tool", "ipython": "tool", "observation": "tool", "function": "tool",
    "function_call": "assistant",  # LLaMA-Factory's ShareGPT: the assistant's call, its value the call's JSON
}  # fmt: skip
# ShareGPT-like files name their keys and roles freely; `tags:` on a dataset maps them (LLaMA-Factory's names).
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call"}  # fmt: skip


@dataclass
class LoadResult:
    conversations: list[Conversation] = field(default_factory=list)
    read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    format: str = ""
    records: list[dict] = field(default_factory=list)  # the raw record of each conversation (split's strata)


# --------------------------------------------------------------------------- files


def expand_paths(path: str) -> list[Path]:
    """A file, a directory (its data files, sorted) or a glob."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory has no {', '.join(SUFFIXES)} files")
        return files
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{p.suffix}' (use {', '.join(SUFFIXES)})")
        return [p]
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(SUFFIXES))
        if files:
            return files
        raise DataError(f"{path}: the pattern matches no data files")
    raise DataError(f"{path}: no such file or directory")


def read_records(path: Path) -> Iterator[tuple[str, dict | RecordProblem]]:
    """Yield (origin, record) pairs; a record that cannot be parsed comes as a RecordProblem."""
    reader = {".jsonl": read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    yield from reader[path.suffix](path)


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | RecordProblem]]:
    """One JSON value per line, with "file:line" origins; blank lines skipped, bad lines as RecordProblem."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            origin = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield origin, RecordProblem(
                    "not UTF-8", f"byte {e.start} of the line is not UTF-8; re-save the file as UTF-8"
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield origin, RecordProblem(
                    "malformed JSON", f"malformed JSON at column {e.colno}: {e.msg}; fix or remove the line"
                )
                continue
            yield origin, record


def read_jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """read_jsonl for files that must be right as a whole (task, prompt, seed and comparison files):
    the first bad line stops reading with a DataError that names it."""
    for where, record in read_jsonl(path):
        if isinstance(record, RecordProblem):
            raise DataError(f"{where}: {record}")
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _read_json(path: Path):
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8; re-save the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json file must hold an array of records (use .jsonl for one per line)")
    for i, record in enumerate(records, 1):
        yield f"{path}: record {i}", record


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise DataError(f"{path}: cannot read parquet file: {e}") from None
    for i, record in enumerate(rows, 1):
        yield f"{path}: row {i}", record


def _read_csv(path: Path):
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8; re-save the file as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for record in reader:
        yield f"{path}:{reader.line_num}", record


# --------------------------------------------------------------------------- formats


def detect_format(records: list[dict], path: str) -> str:
    """Name the layout from the keys of the first records."""
    keys: set[str] = set()
    for r in records:
        keys |= set(r)
    for fmt, needed in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
    ):
        if needed <= keys:
            return fmt
    raise DataError(
        f"{path}: cannot tell the data format from the fields {sorted(keys)}. Expected one of: "
        "messages (messages), sharegpt (conversations), alpaca (instruction, output), "
        "prompt_completion (prompt, completion), text (text). Set `format:` on the dataset, "
        "or map your columns with `columns: {instruction: your_column}`."
    )


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            kind = "missing field" if value is None else "empty field"
            raise RecordProblem(kind, f"field '{key}' is {kind.split()[0]}; fill it or remove the record")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordProblem("bad field type", f"field '{key}' must be text, got {type(value).__name__}")
    return str(value)


def _alpaca(r: dict, tags: dict[str, str] | None = None) -> list[Message]:
    msgs = []
    if _text(r, "system", required=False):
        msgs.append(Message("system", _text(r, "system")))
    history = r.get("history") or []  # LLaMA-Factory's alpaca: earlier [instruction, response] pairs
    if not isinstance(history, list):
        raise RecordProblem("bad field type", "field 'history' must be a list of [instruction, response]")
    for j, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
            raise RecordProblem("bad field type", f"history[{j}] must be [instruction, response] text")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    prompt = _text(r, "instruction")
    extra = _text(r, "input", required=False)
    msgs.append(Message("user", f"{prompt}\n\n{extra}" if extra else prompt))
    msgs.append(Message("assistant", _text(r, "output")))
    return msgs


def _turns(items: Any, field_name: str, tags: dict[str, str] | None = None) -> list[Message]:
    """A list of turns -> Messages. `tags`: ShareGPT-like key and role names (SHAREGPT_TAGS' keys)."""
    if not isinstance(items, list) or not items:
        raise RecordProblem(
            "missing field" if items is None else "bad field type",
            f"field '{field_name}' must be a non-empty list of turns",
        )
    tags = tags or {}
    role_key, content_key = tags.get("role_tag", "role"), tags.get("content_tag", "content")
    roles = {tags[f"{r}_tag"]: r for r in ("user", "assistant", "system") if f"{r}_tag" in tags}
    roles |= {tags[k]: v for k, v in (("observation_tag", "tool"), ("function_tag", "function_call")) if k in tags}
    msgs = []
    for j, turn in enumerate(items):
        where = f"{field_name}[{j}]"
        if not isinstance(turn, dict):
            raise RecordProblem("bad field type", f"{where} must be an object with '{role_key}' and '{content_key}'")
        rk = role_key if role_key in turn else ("role" if "role" in turn else role_key)
        ck = content_key if content_key in turn else ("content" if "content" in turn else content_key)
        msgs.append(_message(turn, where, rk, ck, roles))
    return msgs


def _message(turn: dict, where: str, role_key: str, content_key: str, roles: dict[str, str]) -> Message:
    raw_role = turn.get(role_key)
    role = roles.get(raw_role) or (ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None)
    if role is None:
        raise RecordProblem("unknown role", f"{where}.{role_key} is {raw_role!r}; use one of system, user, "
                            "assistant, tool (or human/gpt/function_call/observation in ShareGPT files)")  # fmt: skip
    if role == "function_call" or (raw_role == "function_call" and role == "assistant"):
        calls = parse_tool_calls(turn.get(content_key), f"{where}.{content_key}")
        return Message("assistant", "", tool_calls=calls, train=_trained(turn, where))
    content = _content(turn.get(content_key), f"{where}.{content_key}")
    calls = parse_tool_calls(turn.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ()
    if not content.strip() and not calls:
        kind = "missing field" if turn.get(content_key) is None else "empty field"
        raise RecordProblem(kind, f"{where}.{content_key} is {kind.split()[0]}; fill it or remove the record")
    if role != "assistant":
        return Message(role, content, tool_call_id=_optional_text(turn, "tool_call_id", where),
                       name=_optional_text(turn, "name", where) if role == "tool" else None)  # fmt: skip
    reasoning, content = split_reasoning(turn, content, where)
    return Message("assistant", content, tool_calls=calls, reasoning=reasoning, train=_trained(turn, where))


def _content(value: Any, where: str) -> str:
    """A turn's text: a string, a number, or OpenAI content parts (text parts only)."""
    if value is None:
        return ""
    if isinstance(value, list):
        kinds = {p.get("type") for p in value if isinstance(p, dict)}
        if kinds - {"text"} or not all(isinstance(p, dict) for p in value):
            raise RecordProblem("unsupported content", f"{where} has non-text parts {sorted(map(str, kinds - {'text'}))}")
        return "".join(str(p.get("text", "")) for p in value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordProblem("bad field type", f"{where} must be text, got {type(value).__name__}")
    return str(value)


def _optional_text(turn: dict, key: str, where: str) -> str | None:
    value = turn.get(key)
    if value is None:
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise RecordProblem("bad field type", f"{where}.{key} must be text, got {type(value).__name__}")
    return str(value)


def _trained(turn: dict, where: str) -> bool:
    """`train: false` or `weight: 0` keeps an assistant turn out of the loss (as Axolotl's `weight`)."""
    train, weight = turn.get("train", True), turn.get("weight", 1)
    if not isinstance(train, bool):
        raise RecordProblem("bad field type", f"{where}.train must be true or false, got {train!r}")
    if weight not in (0, 1) or isinstance(weight, bool):
        raise RecordProblem("bad weight", f"{where}.weight is {weight!r}; a turn's weight is 0 (not trained) or 1")
    return train and weight == 1


def _sharegpt(r: dict, tags: dict[str, str] | None = None) -> list[Message]:
    msgs = _turns(r.get("conversations"), "conversations", {**SHAREGPT_TAGS, **(tags or {})})
    if _text(r, "system", required=False) and msgs[0].role != "system":
        msgs.insert(0, Message("system", _text(r, "system")))
    return msgs


def _messages(r: dict, tags: dict[str, str] | None = None) -> list[Message]:
    return _turns(r.get("messages"), "messages", tags)


def _prompt_completion(r: dict, tags: dict[str, str] | None = None) -> list[Message]:
    # TRL allows both plain strings and message lists for prompt and completion.
    prompt, completion = r.get("prompt"), r.get("completion")
    if isinstance(prompt, list):
        msgs = _turns(prompt, "prompt")
    else:
        msgs = [Message("user", _text(r, "prompt"))]
    if isinstance(completion, list):
        msgs += _turns(completion, "completion")
    else:
        msgs.append(Message("assistant", _text(r, "completion")))
    return msgs


CONVERTERS: dict[str, Callable[[dict, dict | None], list[Message]]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _messages,
    "prompt_completion": _prompt_completion,
}


def check_turns(msgs: list[Message]) -> None:
    """Structure every chat template can render and every response mask can trust."""
    for j, m in enumerate(msgs):
        if m.role == "system" and j > 0:
            raise RecordProblem("misplaced system", f"message {j} is a system message; only the first may be")
        if m.role == "tool" and not (msgs[j - 1].tool_calls or msgs[j - 1].role == "tool"):
            raise RecordProblem("bad turn order", f"message {j} is a tool result with no tool call before it")
    body = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    if not body or body[0].role != "user":
        raise RecordProblem("bad turn order", "the conversation must start with a user message (after an optional system)")
    for j in range(1, len(body)):
        if body[j].role == "assistant" and body[j - 1].role == "assistant":
            raise RecordProblem("bad turn order", "two assistant turns in a row; merge them or add the user turn between")
    if not any(m.role == "assistant" for m in body):
        raise RecordProblem("no assistant turn", "the conversation has no assistant turn, so nothing to learn")


def to_conversation(record: Any, fmt: str, origin: str, system_prompt: str | None,
                    tools: tuple[dict, ...] = (), tags: dict[str, str] | None = None) -> Conversation:  # fmt: skip
    """One record -> a Conversation; `tools` (the dataset's) apply where the record names none."""
    if not isinstance(record, dict):
        raise RecordProblem("not an object", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "text":
        return Conversation(text=_text(record, "text"), origin=origin)
    msgs = CONVERTERS[fmt](record, tags)
    if system_prompt and msgs[0].role != "system":
        msgs.insert(0, Message("system", system_prompt))
    check_turns(msgs)
    own = parse_tools(record.get("tools"), "tools")
    return Conversation(messages=tuple(msgs), origin=origin, tools=own or tools)


def load_conversations(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None,
    on_bad_record: str = "error", system_prompt: str | None = None, tools=None, tags: dict[str, str] | None = None,
) -> LoadResult:  # fmt: skip
    """Read every file of one dataset spec; bad records raise or are counted, never silently lost.
    `tools`: function schemas for every record without its own; `tags`: ShareGPT key and role names."""
    result = LoadResult()
    try:
        dataset_tools = parse_tools(tools, "tools")
    except RecordProblem as e:
        raise DataError(f"{path}: the dataset's {e}") from None
    rename = {src: dst for dst, src in (columns or {}).items()}
    for file in expand_paths(path):
        pairs = list(read_records(file))
        if not pairs:
            continue
        file_fmt = fmt
        if fmt == "auto":
            sample = [_renamed(r, rename) for _, r in pairs[:20] if isinstance(r, dict)]
            file_fmt = detect_format(sample, str(file))
        result.format = file_fmt if result.format in ("", file_fmt) else "mixed"
        for origin, record in pairs:
            result.read += 1
            try:
                if isinstance(record, RecordProblem):
                    raise record
                record = _renamed(record, rename) if isinstance(record, dict) else record
                result.conversations.append(to_conversation(record, file_fmt, origin, system_prompt, dataset_tools, tags))
                result.records.append(record)
            except RecordProblem as e:
                if on_bad_record == "error":
                    raise DataError(
                        f"{origin}: {e} (format {file_fmt}). "
                        "Fix the record, or set data.on_bad_record=skip to skip and count such records."
                    ) from None
                result.skipped[e.kind] += 1
    if result.read == 0:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return result


def _renamed(record: dict, rename: dict[str, str]) -> dict:
    return {rename.get(k, k): v for k, v in record.items()} if rename else record


def load_field_records(path: str, fields: tuple[str, ...], optional: tuple[str, ...] = (),
                       columns: dict[str, str] | None = None, on_bad_record: str = "error") -> LoadResult:  # fmt: skip
    """Flat records of one dataset spec (classification, seq2seq): `fields` required, `optional` kept when
    present. LoadResult.records holds (origin, {field: value}) pairs; bad records raise or are counted."""
    result = LoadResult(format="fields")
    rename = {src: dst for dst, src in (columns or {}).items()}
    for file in expand_paths(path):
        for origin, record in read_records(file):
            result.read += 1
            try:
                if isinstance(record, RecordProblem):
                    raise record
                if not isinstance(record, dict):
                    raise RecordProblem("not an object", f"expected an object with {', '.join(fields)}")
                record = _renamed(record, rename)
                missing = [f for f in fields if record.get(f) is None or record.get(f) == ""]
                if missing:
                    raise RecordProblem(f"missing {missing[0]}", f"missing field {missing[0]!r} (has: "
                                        f"{', '.join(record) or 'nothing'}); map a column with columns: "
                                        f"{{{missing[0]}: your_column}}")  # fmt: skip
                result.records.append((origin, {f: record[f] for f in fields + optional if record.get(f) is not None}))
            except RecordProblem as e:
                if on_bad_record == "error":
                    raise DataError(f"{origin}: {e}. Fix the record, or set data.on_bad_record=skip to skip "
                                    "and count such records.") from None  # fmt: skip
                result.skipped[e.kind] += 1
    if result.read == 0:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return result
