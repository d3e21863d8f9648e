"""Instruction files of any common layout -> one internal `Conversation` type.

Readers keep the origin of every record (file and line, or record/row number) so that any
problem found later is reported where the user can fix it.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def read_records(path: Path, raw: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (origin, record) pairs; a record that cannot be parsed comes as a RecordProblem. `raw`: a JSONL
    file's lines as bytes, parsed later by `Conversion.record` (in the worker that encodes them)."""
    if path.suffix == ".jsonl":
        yield from read_jsonl(path, raw)
        return
    reader = {".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    yield from reader[path.suffix](path)


def read_jsonl(path: Path, raw: bool = False) -> Iterator[tuple[str, Any]]:
    """One JSON value per line, with "file:line" origins; blank lines skipped, bad lines as RecordProblem.
    A .gz file is read through gzip (benchmark data ships compressed, e.g. HumanEval.jsonl.gz). `raw`: each
    line as bytes, unparsed (`json_value` parses it)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        for lineno, line in _lines(f):
            if lineno == 1:
                line = line.removeprefix(codecs.BOM_UTF8)  # Notepad and PowerShell write one; it is no JSON
            if line.strip():
                yield f"{path}:{lineno}", line if raw else json_value(line)


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a binary file, ending at \\n, \\r\\n or a bare \\r (classic Mac files): JSON
    forbids a raw CR inside a string, so a CR ends a line of JSON wherever it stands, as it does in editors."""
    lineno = 0
    for chunk in f:  # chunks end at \n; splitlines() cuts them further only at \r (bytes know no other breaks)
        for line in chunk.splitlines() or [b""]:
            lineno += 1
            yield lineno, line


def json_value(raw: bytes) -> Any:
    """One line's JSON value, or a RecordProblem saying what is wrong with it."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _not_utf8(raw, e)
    try:
        value, hinted = _parse(line)
    except json.JSONDecodeError as e:
        if "\0" in line:  # JSON allows no raw NUL anywhere; a file full of them is UTF-16 or binary
            return RecordProblem("NUL byte", f"the line has a NUL byte at column {line.index(chr(0)) + 1}: the "
                                 "file looks binary or UTF-16; re-save it as UTF-8 text")  # fmt: skip
        return RecordProblem("malformed JSON", f"malformed JSON at column {e.colno}: {e.msg}; fix or remove the line")
    except RecursionError:
        depth, _, parts = _too_deep(line)
        return RecordProblem("too deeply nested", _nesting(depth - 1, parts))  # depth 1: the record itself
    return _checked(value, hinted)


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> RecordProblem:
    detail = f"byte {e.start + 1} of the line is not UTF-8; re-save the file as UTF-8{_utf16_note(raw)}"
    try:  # the bad bytes, kept as surrogates, tell which field holds them
        found = _bad_value(json.loads(raw.decode("utf-8", "surrogateescape")))
    except (json.JSONDecodeError, RecursionError):
        found = None
    if found and isinstance(found[1], str):
        detail += f" (it is in field '{_field_path(found[0])}')"
    return RecordProblem("not UTF-8", detail)


def _utf16_note(data: bytes) -> str:
    return " (it is UTF-16: it starts with that byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""


class _NonFinite(Exception):
    """The parser met NaN, Infinity or -Infinity."""


def _refuse_constant(name: str):
    raise _NonFinite(name)


# NaN and Infinity are no JSON, but Python's json reads them as floats, which str() would make the text "nan";
# a lone surrogate escape ("\ud800") reads as a string no tokenizer or file can encode. A value that may hold
# either is walked to name the field; the rest (nearly all) cost a regex search.
_NO_CONSTANTS = json.JSONDecoder(parse_constant=_refuse_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _parse(text: str) -> tuple[Any, bool]:
    """(value, whether it may hold a NaN, Infinity or lone surrogate); raises as json.loads does."""
    try:
        return _NO_CONSTANTS.decode(text), bool(_SURROGATE_ESCAPE.search(text))
    except _NonFinite:
        return json.loads(text), True


def _checked(value: Any, hinted: bool) -> Any:
    """`value`, or a RecordProblem naming its first NaN, Infinity or lone surrogate (`hinted`: its text can
    hold one)."""
    found = _bad_value(value) if hinted else None
    if found is None:
        return value
    where, bad = found
    field_name = _field_path(where)
    if isinstance(bad, float):
        name = _JSON_NAMES.get(str(bad), bad)
        return RecordProblem("bad value", f"field '{field_name}' is {name}, which is neither text nor a JSON "
                             "number; quote it if it is text, or remove the record")  # fmt: skip
    return RecordProblem("bad text", f"field '{field_name}' holds the lone surrogate \\u{ord(bad):04x}, half of a "
                         "character that cannot be written as UTF-8; fix the escape or remove the record")  # fmt: skip


def _bad_value(value: Any) -> tuple[tuple, Any] | None:
    """(path, the bad float or character) of the first non-finite number or surrogate in a parsed value;
    iterative, as the value may be nested nearly as deep as the parser allows."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack += [((*where, k), x) for k, x in reversed(v.items())]
            v = "".join(map(str, v))  # keys too: tools' schemas are rendered as text
        elif isinstance(v, list):
            stack += [((*where, i), x) for i, x in reversed(list(enumerate(v)))]
        if isinstance(v, float) and not math.isfinite(v):
            return where, v
        if isinstance(v, str) and (m := _SURROGATE.search(v)):
            return where, m.group()
    return None


def _field_path(parts) -> str:
    """("messages", 1, "content") -> "messages[1].content"."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or "(the record)"


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def _too_deep(text: str) -> tuple[int, int, list]:
    """(depth, offset, path) of the deepest nesting in JSON `text`, path being the keys and indexes leading
    there (its first three): a RecursionError from the parser tells neither where nor in which field."""
    path: list = []  # per open container: its current key (object) or index (array)
    pending = False  # the next string is an object's key
    depth, offset, deepest = 0, 0, []
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok in "[{":
            path.append(0 if tok == "[" else "")
            pending = tok == "{"
            if len(path) > depth:
                depth, offset, deepest = len(path), m.start(), path[:3]
        elif tok in "]}":
            if path:
                path.pop()
            pending = False
        elif tok == ",":
            if path and isinstance(path[-1], int):
                path[-1] += 1
            pending = bool(path) and isinstance(path[-1], str)
        elif pending:
            path[-1], pending = tok[1:-1], False
    return depth, offset, deepest


def _nesting(depth: int, parts: list) -> str:
    where = f"field '{parts[0]}'" if parts and isinstance(parts[0], str) else "the record"
    return f"{where} is nested {depth} levels deep, deeper than the JSON reader can follow; flatten it"


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
    """An array of records; the file parses as a whole, so a syntax fault stops it (with its line), while
    a bad value stops only its record ("record N", its index from 1)."""
    text = _json_text(path)
    try:
        records, hinted = _parse(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
    except RecursionError:
        depth, offset, parts = _too_deep(text)
        line = text.count("\n", 0, offset) + 1
        where = f"record {parts[0] + 1}: " if parts and isinstance(parts[0], int) else ""
        raise DataError(f"{path}:{line}: {where}{_nesting(depth - 2, parts[1:])}") from None  # depth 2: the record
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json file must hold an array of records (use .jsonl for one per line)")
    for i, record in enumerate(records, 1):
        yield f"{path}: record {i}", _checked(record, hinted)


def _json_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        note = _utf16_note(data)
        raise DataError(f"{path}:{line}: bytes that are not UTF-8; re-save the file as UTF-8{note}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; a .json file holds an array of records: [{{...}}, {{...}}]")
    return text


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    i = 0
    try:  # batch by batch (within row groups): a file of millions of rows is never held as Python objects whole
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                i += 1
                yield f"{path}: row {i}", record  # NaN cells reach the field checks (_text) as floats, refused there
    except Exception as e:  # noqa: BLE001 -- pyarrow raises many types for a damaged file
        if isinstance(e, (DataError, RecordProblem)):
            raise
        raise DataError(f"{path}: cannot read parquet file{f' after row {i}' if i else ''}: {e}") from None


# --------------------------------------------------------------------------- CSV


class _CsvLines:
    """csv.reader over a text, with what it does not tell: the line each record starts on, and where a record
    it gave up on ends (it goes on at the next line, which may still be inside that record's quotes)."""

    def __init__(self, text: str):
        self.text = text
        self._lines = iter(io.StringIO(text, newline=""))  # newline="": quoted line breaks stay as written
        self.reader = csv.reader(self._lines, strict=True)  # strict: a stray quote is an error, not dropped text
        self._passed = 0  # lines read past the reader, to the end of records it gave up on
        self._all: list[str] | None = None

    @property
    def count(self) -> int:
        """Lines read so far; the reader reads a record's lines only as it needs them, so before a record this
        is the line before its first (its own line_num, after it, is the record's last)."""
        return self.reader.line_num + self._passed

    def rest_of_record(self, first: int) -> str:
        """The text of the record from line `first` the reader gave up on, read on to where its quotes balance."""
        if self._all is None:  # only after an error
            self._all = io.StringIO(self.text, newline="").readlines()
        text = "".join(self._all[first - 1 : self.count])
        while text.count('"') % 2 and (line := next(self._lines, None)) is not None:
            text, self._passed = text + line, self._passed + 1
        return text


def _read_csv(path: Path):
    """A header row, then one record per row; "file:line" origins name each record's first line. Empty cells
    are missing values; every other cell is text as written ("NaN" stays "NaN": no pandas-style parsing)."""
    # bad bytes stay as surrogates (surrogateescape), so that they stop only the record that holds them
    lines = _CsvLines(path.read_bytes().decode("utf-8-sig", "surrogateescape"))
    header = _csv_header(path, lines)
    suspect = "\0" in lines.text or bool(_SURROGATE.search(lines.text))  # else no cell needs checking
    while True:
        first = lines.count + 1
        try:
            row = next(lines.reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield f"{path}:{first}", _csv_fault(path, first, lines.rest_of_record(first), header, e)
            continue
        if row:  # csv.reader gives [] for a blank line
            yield f"{path}:{first}", _csv_record(header, row, suspect)


def _csv_header(path: Path, lines: _CsvLines) -> list[str]:
    try:
        header = next((row for row in lines.reader if row), [])
    except csv.Error as e:
        raise DataError(f"{path}:{lines.count}: cannot read the header row: {e}") from None
    if any(_SURROGATE.search(h) or "\0" in h for h in header):
        raise DataError(f"{path}:{lines.count}: the header row is not UTF-8 text (the file may be UTF-16 or "
                        "binary); re-save it as UTF-8")  # fmt: skip
    twice = [h for h in header if header.count(h) > 1]
    if twice:  # one column would silently hide the other
        raise DataError(f"{path}:{lines.count}: the header names column {twice[0]!r} twice; rename one")
    return header


def _csv_record(header: list[str], row: list[str], suspect: bool) -> dict | RecordProblem:
    if len(row) > len(header):
        extra = row[len(header)]
        return RecordProblem("extra fields", f"the row has {len(row)} fields but the header names {len(header)}: "
                             f"field {len(header) + 1} ({extra[:30]!r}) has no column; quote values that contain "
                             'commas ("a, b"), or add the column to the header')  # fmt: skip
    if suspect and (problem := _cell_problem(header, row)):
        return problem
    # cells the row lacks, and empty ones, are missing values: "" is not text anyone wrote
    row = row + [""] * (len(header) - len(row))
    return {name: cell if cell != "" else None for name, cell in zip(header, row)}


def _cell_problem(header: list[str], row: list[str]) -> RecordProblem | None:
    """A cell with a byte that is not UTF-8 (surrogateescape keeps byte b as the surrogate U+DC00+b) or a NUL."""
    for name, cell in zip(header, row):
        if m := _SURROGATE.search(cell):
            return RecordProblem("not UTF-8", f"field '{name}' has the byte 0x{ord(m.group()) - 0xDC00:02x}, which "
                                 "is not UTF-8; re-save the file as UTF-8")  # fmt: skip
        if "\0" in cell:
            return RecordProblem("NUL byte", f"field '{name}' has a NUL byte: the file looks binary or UTF-16; "
                                 "re-save it as UTF-8 text")  # fmt: skip
    return None


def _csv_fault(path: Path, first: int, text: str, header: list[str], error: csv.Error) -> RecordProblem:
    """What csv.reader refused in the record starting on line `first`, found again by scanning its text."""
    index, what = _csv_scan(text, csv.field_size_limit())
    name = f"field '{header[index]}'" if index < len(header) else f"field {index + 1}"
    if what == "open":  # everything after the quote is inside it, so no later record can be told apart
        raise DataError(f"{path}:{first}: {name} opens a quote that is never closed, so the rest of the file "
                        'is inside it; close the quote (a quote inside a quoted field is written "")')  # fmt: skip
    if what == "long":
        return RecordProblem("field too long", f"{name} is longer than {csv.field_size_limit()} characters, the "
                             "CSV reader's limit; keep texts this long in a .jsonl file")  # fmt: skip
    if what == "after quote":
        return RecordProblem("bad quoting", f"{name} has text after its closing quote; quote the whole value and "
                             'write each quote inside it as ""')  # fmt: skip
    return RecordProblem("bad CSV", f"{name}: {error}; fix the row")


def _csv_scan(text: str, limit: int) -> tuple[int, str]:
    """(field index, fault) of the first field of one CSV record that runs past `limit` characters ("long"),
    has text after its closing quote ("after quote") or is inside a quote at the end ("open"): the faults
    csv.reader (strict) stops at, as its own error names neither the field nor, for a quoted one, the line."""
    index, size, state = 0, 0, "start"  # state: start | plain | quoted | closed (just after a closing quote)
    for ch in text:
        if state == "quoted":
            state, size = ("closed", size) if ch == '"' else ("quoted", size + 1)
        elif ch == '"' and state in ("start", "closed"):  # opens a quoted field, or "" inside one
            state, size = "quoted", size + (state == "closed")
        elif ch == ",":
            index, size, state = index + 1, 0, "start"
        elif ch in "\r\n":
            return index, "end"
        elif state == "closed":
            return index, "after quote"
        else:
            state, size = "plain", size + 1
        if size > limit:
            return index, "long"
    return index, "open" if state == "quoted" else "end"


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
    return _scalar_text(value, f"field '{key}'")


def _scalar_text(value: Any, where: str) -> str:
    """Text, or a number written as text; a NaN or infinity (Parquet's missing float, JSON's NaN) is no text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordProblem("bad field type", f"{where} must be text, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordProblem("bad value", f"{where} is {value}, a number where text is expected (a missing value?); "
                            "fill in the text, or remove the record")  # fmt: skip
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
            others = sorted(map(str, kinds - {"text"}))
            raise RecordProblem("unsupported content", f"{where} has non-text parts {others}")
        return "".join(_scalar_text(p.get("text", ""), f"{where}[{j}].text") for j, p in enumerate(value))
    return _scalar_text(value, where)


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
        raise RecordProblem("bad turn order", "the conversation must start with a user message "
                            "(after an optional system)")  # fmt: skip
    for j in range(1, len(body)):
        if body[j].role == "assistant" and body[j - 1].role == "assistant":
            raise RecordProblem("bad turn order", "two assistant turns in a row; merge them or add the user turn "
                                "between")  # fmt: skip
    if not any(m.role == "assistant" for m in body):
        raise RecordProblem("no assistant turn", "the conversation has no assistant turn, so nothing to learn")


def to_conversation(record: Any, fmt: str, origin: str, system_prompt: str | None,
                    tools: tuple[dict, ...] = (), tags: dict[str, str] | None = None) -> Conversation:  # fmt: skip
    """One record -> a Conversation; `tools` (the dataset's) apply where the record names none."""
    if not isinstance(record, dict):
        raise RecordProblem("not an object", f"expected a JSON object, got {type(record).__name__}")
    extras = record_extras(record)
    if fmt == "text":
        return Conversation(text=_text(record, "text"), origin=origin, **extras)
    msgs = CONVERTERS[fmt](record, tags)
    if system_prompt and msgs[0].role != "system":
        msgs.insert(0, Message("system", system_prompt))
    check_turns(msgs)
    own = parse_tools(record.get("tools"), "tools")
    return Conversation(messages=tuple(msgs), origin=origin, tools=own or tools, **extras)


def record_extras(record: dict) -> dict:
    """The record's `id`, `metadata` and `loss_weight`, checked: a value of the wrong kind is refused, never
    dropped or turned into text. CSV cells are text, so a JSON object or a number written as text is read."""
    rid, meta, weight = record.get("id"), record.get("metadata"), record.get("loss_weight")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise RecordProblem("bad id", f"field 'id' must be text or an integer, got {type(rid).__name__} {rid!r}")
    if isinstance(meta, str) and meta.strip():
        meta = _json_object(meta, "metadata")
    if meta is not None and meta != "" and not isinstance(meta, dict):
        raise RecordProblem("bad metadata", f"field 'metadata' must be a JSON object ({{\"category\": ...}}), got "
                            f"{type(meta).__name__}")  # fmt: skip
    if meta and isinstance(problem := _checked({"metadata": meta}, True), RecordProblem):  # Parquet, hub rows
        raise problem
    return {"id": None if rid in (None, "") else str(rid), "metadata": meta or None, "loss_weight": _weight(weight)}


def _json_object(text: str, name: str) -> Any:
    try:
        return _parse(text)[0]
    except (ValueError, RecursionError):
        raise RecordProblem(f"bad {name}", f"field '{name}' is text that is no JSON object: {text[:60]!r}") from None


def _weight(value: Any) -> float:
    """A record's loss_weight: a finite number above 0 (a number written as text included)."""
    if value is None or value == "":
        return 1.0
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or number <= 0:
        raise RecordProblem("bad loss_weight", f"field 'loss_weight' must be a number above 0, got {value!r}; "
                            "to keep a record out of the loss, remove it or set train: false on its turns")  # fmt: skip
    return float(number)


def load_conversations(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None,
    on_bad_record: str = "error", system_prompt: str | None = None, tools=None, tags: dict[str, str] | None = None,
    records: Iterable[tuple[str, Any]] | None = None,
) -> LoadResult:  # fmt: skip
    """Read every file of one dataset spec into memory (`iter_conversations`, with each raw record kept)."""
    result = LoadResult()
    for conv, record in iter_conversations(path, fmt, columns, on_bad_record, system_prompt, tools, tags, records,
                                           result):  # fmt: skip
        result.conversations.append(conv)
        result.records.append(record)
    return result


@dataclass(frozen=True)
class Conversion:
    """How the records of one dataset become conversations: with its records, what a pipeline worker needs."""

    rename: dict[str, str] = field(default_factory=dict)  # a column's name in the file -> sftlab's
    system_prompt: str | None = None
    tools: tuple[dict, ...] = ()  # the dataset's tools: every record without its own gets them
    tags: dict[str, str] | None = None  # ShareGPT key and role names

    @classmethod
    def of(cls, path: str, columns: dict[str, str] | None = None, system_prompt: str | None = None, tools=None,
           tags: dict[str, str] | None = None) -> "Conversion":  # fmt: skip
        try:
            dataset_tools = parse_tools(tools, "tools")
        except RecordProblem as e:
            raise DataError(f"{path}: the dataset's {e}") from None
        return cls({src: dst for dst, src in (columns or {}).items()}, system_prompt, dataset_tools, tags)

    def record(self, raw: Any) -> Any:
        """The record the converters read: parsed (a JSONL line read raw), its columns renamed; a record that
        could not be read raises its RecordProblem."""
        if isinstance(raw, bytes):
            raw = json_value(raw)
        if isinstance(raw, RecordProblem):
            raise raw
        return _renamed(raw, self.rename) if isinstance(raw, dict) else raw

    def conversation(self, record: Any, fmt: str | None, origin: str) -> Conversation:
        return _converted(record, fmt, origin, self.system_prompt, self.tools, self.tags)


Record = tuple[str, Any, "str | None"]  # (origin, the record as read, its file's format): what iter_records yields


def iter_records(path: str, fmt: str, conversion: Conversion, records: Iterable[tuple[str, Any]] | None,
                 result: LoadResult, raw: bool = False) -> Iterator[Record]:  # fmt: skip
    """(origin, record as read, its file's format) of each record of one dataset spec, read as it goes and
    counted in `result`; `raw`: JSONL lines unparsed (see read_records)."""
    for file, pairs in _record_streams(path, records, raw):
        file_fmt, pairs = _file_format(pairs, fmt, conversion, file)
        if file_fmt:
            result.format = file_fmt if result.format in ("", file_fmt) else "mixed"
        for origin, record in pairs:
            result.read += 1
            yield origin, record, file_fmt
    if result.read == 0:
        raise DataError(f"{path}: the dataset is empty (no records)")


def iter_conversations(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None,
    on_bad_record: str = "error", system_prompt: str | None = None, tools=None, tags: dict[str, str] | None = None,
    records: Iterable[tuple[str, Any]] | None = None, result: LoadResult | None = None,
) -> Iterator[tuple[Conversation, dict]]:  # fmt: skip
    """(conversation, raw record) of each record of one dataset spec, read as it goes (a file of millions of lines
    is never held whole); bad records raise or are counted in `result`, never silently lost.
    `tools`: function schemas for every record without its own; `tags`: ShareGPT key and role names;
    `records`: (origin, record) pairs of a dataset that is no file, read instead (`path` then names it)."""
    result = LoadResult() if result is None else result
    conversion = Conversion.of(path, columns, system_prompt, tools, tags)
    for origin, record, file_fmt in iter_records(path, fmt, conversion, records, result):
        try:
            record = conversion.record(record)
            yield conversion.conversation(record, file_fmt, origin), record
        except RecordProblem as e:
            if on_bad_record == "error":
                raise bad_record_error(origin, e, file_fmt) from None
            result.skipped[e.kind] += 1


def bad_record_error(origin: str, problem: RecordProblem, fmt: str | None = None) -> DataError:
    """What data.on_bad_record=error raises for a record that cannot be read or converted."""
    note = f" (format {fmt})" if fmt else ""
    return DataError(f"{origin}: {problem}{note}. Fix the record, or set data.on_bad_record=skip to skip and "
                     "count such records.")  # fmt: skip


def _record_streams(path: str, records: Iterable[tuple[str, Any]] | None,
                    raw: bool = False) -> Iterator[tuple[str, Iterator]]:  # fmt: skip
    """(name, its (origin, record) pairs, read lazily) for each file of `path`, or once for the given records."""
    if records is not None:
        yield path, iter(records)
        return
    for file in expand_paths(path):
        yield str(file), read_records(file, raw)


def _file_format(pairs: Iterator, fmt: str, conversion: Conversion, file: str) -> tuple[str | None, Iterator]:
    """(the layout of one file, its pairs from the start): `fmt`, or detected from its first 20 objects; None
    when it has no object at all, so that its first bad record is reported (or every one counted) rather than
    its empty field list. Only the pairs up to the 20th object are held to look at."""
    if fmt != "auto":
        return fmt, pairs
    head, sample = [], []
    for pair in pairs:
        head.append(pair)
        try:
            record = conversion.record(pair[1])
        except RecordProblem:
            continue
        if isinstance(record, dict):
            sample.append(record)
            if len(sample) == 20:
                break
    rest = itertools.chain(head, pairs)
    return (detect_format(sample, file) if sample else None), rest


def _converted(record: Any, fmt: str | None, origin: str, system_prompt: str | None, tools: tuple[dict, ...],
               tags: dict[str, str] | None) -> Conversation:  # fmt: skip
    try:
        return to_conversation(record, fmt, origin, system_prompt, tools, tags)
    except RecursionError:  # a JSON string inside the record (tool call arguments) parsed later, too deep
        raise RecordProblem("too deeply nested", "a JSON string in the record (tool call arguments or tools) is "
                            "nested deeper than the JSON reader can follow; flatten it") from None  # fmt: skip


def _bad_record(result: LoadResult, origin: str, problem: RecordProblem, on_bad_record: str) -> None:
    """Raise the problem with where it is, or (data.on_bad_record: skip) count it under its kind."""
    if on_bad_record == "error":
        raise bad_record_error(origin, problem) from None
    result.skipped[problem.kind] += 1


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
                result.records.append((origin, _field_values(_renamed(record, rename), fields, optional)))
            except RecordProblem as e:
                _bad_record(result, origin, e, on_bad_record)
    if result.read == 0:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return result


def _field_values(record: dict, fields: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    """{field: value} of a flat record; each value text or a number (a label may be either), never a NaN,
    infinity, list or object, which str() would turn into the text "nan" or "[...]"."""
    missing = [f for f in fields if record.get(f) is None or record.get(f) == ""]
    if missing:
        raise RecordProblem(f"missing {missing[0]}", f"missing field {missing[0]!r} (has: "
                            f"{', '.join(record) or 'nothing'}); map a column with columns: "
                            f"{{{missing[0]}: your_column}}")  # fmt: skip
    values = {f: record[f] for f in fields + optional if record.get(f) is not None}
    for f, value in values.items():
        if not isinstance(value, (str, int, float)):
            raise RecordProblem("bad field type", f"field {f!r} must be text or a number, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordProblem("bad value", f"field {f!r} is {value}, a number where text or a label is expected "
                                "(a missing value?); fill it in, or remove the record")  # fmt: skip
    return values
