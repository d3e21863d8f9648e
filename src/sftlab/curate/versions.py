"""Data versions: the manifest of `sftlab data clean/split` lists every record it wrote by id and content hash,
so two versions of a dataset can be compared (`sftlab data diff`) and a run's data (summary.json's
`data_manifests`: the sha256 of each manifest) traced to the exact records it trained on.

A record's id is its own `id` field when it has one. Otherwise it is derived from its content
(`sha256:` and the first 16 hex digits of its hash), not its line: an id from the line would change for
every record after an insertion. So without `id` fields an edited record shows as one removed and one
added; with them, as changed. A repeated id (exact copies, or a reused `id`) gets `#2`, `#3`... in order.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from sftlab.errors import DataError

RECORDS = "records"  # the manifest key; manifests from before it have no per-record entries
SHOWN = 20  # ids printed per kind; --output has them all


def record_digest(record) -> str:
    """sha256 of the record's canonical JSON (sorted keys, no spaces, UTF-8): the same record, the same hash."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def own_id(record) -> str | None:
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return str(value)


def record_entries(files: list[tuple[str, list]]) -> list[dict]:
    """One {file, line, id, sha256} per record of each (file name, records in line order)."""
    seen: Counter = Counter()
    entries = []
    for name, records in files:
        for line, record in enumerate(records, 1):
            digest = record_digest(record)
            base = own_id(record) or f"sha256:{digest[:16]}"
            seen[base] += 1
            rid = base if seen[base] == 1 else f"{base}#{seen[base]}"
            entries.append({"file": name, "line": line, "id": rid, "sha256": digest})
    return entries


def manifest_json(manifest: dict) -> str:
    """The manifest as indented JSON, except that each record entry takes one line: a million records stay
    a million lines (greppable by id), not six million."""
    head = {k: v for k, v in manifest.items() if k != RECORDS}
    text = json.dumps(head, indent=1, ensure_ascii=False)
    if RECORDS not in manifest:
        return text
    rows = ",\n".join("  " + json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in manifest[RECORDS])
    body = f"[\n{rows}\n ]" if rows else "[]"
    return (text[:-2] + ",\n" if head else "{\n") + f' "{RECORDS}": {body}\n}}'


def manifest_path(path: str | Path) -> Path:
    """A manifest file, or the directory `data clean/split` wrote it into."""
    path = Path(path)
    return path / "manifest.json" if path.is_dir() else path


def read_entries(path: str | Path) -> list[dict]:
    """The per-record entries of a manifest; a clear error for a file that is not one, or is an older one."""
    path = manifest_path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or "outputs" not in manifest:
        raise DataError(f"{path}: not a manifest written by `sftlab data clean` or `sftlab data split`")
    if not isinstance(manifest.get(RECORDS), list):
        raise DataError(f"{path}: no per-record entries (written by {manifest.get('tool', 'an older sftlab')}, "
                        "before manifests listed records); rerun the `sftlab data clean/split` that wrote it")  # fmt: skip
    return manifest[RECORDS]


def diff(a: list[dict], b: list[dict]) -> dict:
    """Records added (ids only in b), removed (only in a), changed (same id, other hash) and moved (same id
    and hash, another file: a split that put it elsewhere), and how many are unchanged."""
    ia, ib = {e["id"]: e for e in a}, {e["id"]: e for e in b}
    common = [k for k in ia if k in ib]
    changed = [{"id": k, "a": ia[k], "b": ib[k]} for k in common if ia[k]["sha256"] != ib[k]["sha256"]]
    moved = [{"id": k, "a": ia[k], "b": ib[k]} for k in common
             if ia[k]["sha256"] == ib[k]["sha256"] and ia[k]["file"] != ib[k]["file"]]  # fmt: skip
    result = {"added": [ib[k] for k in ib if k not in ia], "removed": [ia[k] for k in ia if k not in ib],
              "changed": changed, "moved": moved}  # fmt: skip
    counts = {kind: len(items) for kind, items in result.items()}
    counts["unchanged"] = len(common) - counts["changed"] - counts["moved"]
    return {"counts": counts, **result}


def run_diff(path_a: str, path_b: str, output: str | None = None, say=print) -> dict:
    """`sftlab data diff`: print the counts and ids of what differs; OUTPUT gets the full lists."""
    from sftlab.files import file_digest

    a, b = read_entries(path_a), read_entries(path_b)
    result = diff(a, b)
    sides = {side: {"path": str(manifest_path(p)), "sha256": file_digest(manifest_path(p)), "records": len(entries)}
             for side, p, entries in (("a", path_a, a), ("b", path_b, b))}  # fmt: skip
    result = {**sides, **result}
    for side in ("a", "b"):  # the sha256 is what a run's summary.json lists under data_manifests
        say(f"{side.upper()} {sides[side]['path']}  ({sides[side]['records']} records, sha256 {sides[side]['sha256']})")
    say(", ".join(f"{kind} {n}" for kind, n in result["counts"].items()))
    for kind in ("added", "removed", "changed", "moved"):
        _say_ids(kind, result[kind], output, say)
    if output:
        Path(output).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        say(f"wrote {output}")
    return result


def _say_ids(kind: str, items: list[dict], output: str | None, say) -> None:
    if not items:
        return
    ids = [item["id"] for item in items[:SHOWN]]
    more = len(items) - len(ids)
    tail = f" ... and {more} more" if more else ""
    if more and not output:
        tail += " (--output FILE.json lists all)"
    say(f"  {kind:8} {', '.join(ids)}{tail}")
