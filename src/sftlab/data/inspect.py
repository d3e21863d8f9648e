"""`sftlab data inspect` / `data tokenize`: a split tokenized as training would, shown (the report table,
examples with the loss mask) or written out as input_ids/labels JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sftlab.config import Config, DatasetSpec, ModelConfig, load_config
from sftlab.data.dataset import TokenizedSplit, load_split
from sftlab.data.formats import SUFFIXES
from sftlab.data.tokenize import IGNORE, DatasetReport

OPEN, CLOSE = "[[", "]]"  # marks supervised text when colour is off


def inspection_config(source: str, overrides: list[str], split: str) -> Config:
    """The run YAML `source`, or, for a data file, directory or glob, the default config with it as data.<split>."""
    if Path(source).is_dir() or Path(source).suffix in SUFFIXES or any(c in source for c in "*?["):
        cfg = load_config(None, overrides)
        setattr(cfg.data, split, [DatasetSpec(path=os.path.abspath(source))])
        return cfg
    return load_config(source, overrides)


def load_for_inspection(source: str, overrides: list[str], split: str,
                        load_tokenizer: Callable[[ModelConfig], object]) -> tuple[Config, object, TokenizedSplit]:
    """(config, tokenizer, data.<split> tokenized). The tokenizer loader is passed in: sftlab.model sits
    above sftlab.data, so this module cannot import it."""
    cfg = inspection_config(source, overrides, split)
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, load_split(cfg.data, tokenizer, split)


def write_tokenized(split: TokenizedSplit, out: Path) -> tuple[int, Path]:
    """OUT as {input_ids, labels} JSONL (with the record's id, metadata and loss_weight where it has them) and the
    per-dataset report beside it: (examples kept, report path)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in split.dataset:
            f.write(json.dumps(_tokenized_line(row), ensure_ascii=False) + "\n")
    report = out.with_suffix(".report.json")
    report.write_text(json.dumps([r.to_dict() for r in split.reports], ensure_ascii=False, indent=1))
    return sum(r.kept for r in split.reports), report


def _tokenized_line(row: dict) -> dict:
    line = {"input_ids": row["input_ids"], "labels": row["labels"]}
    if row.get("id") is not None:
        line["id"] = row["id"]
    if row.get("metadata"):
        line["metadata"] = json.loads(row["metadata"])
    if row.get("loss_weight", 1.0) != 1.0:
        line["loss_weight"] = row["loss_weight"]
    return line


def show_split(console: Console, split: TokenizedSplit, tokenizer, name: str, num: int, color: bool) -> None:
    """The report table of data.<name>, then its first `num` examples with the supervised text marked."""
    cached = f", {split.cache_hits} from cache" if split.cache_hits else ""
    print_report(console, split.reports, f"data.{name}: {len(split.dataset)} examples{cached}")
    legend = "supervised text in green" if color else "supervised text inside [[ ]]"
    for i in range(min(num, len(split.dataset))):
        row = split.dataset[i]
        console.rule(f"example {i} ({len(row['input_ids'])} tokens; {legend})")
        console.print(marked_example(tokenizer, row["input_ids"], row["labels"], color))


def report_console(color: str = "auto") -> Console:
    """A console for reports: `color` auto|always|never; 160 columns when not a terminal (pipes, logs)."""
    force = {"always": True, "never": False}.get(color)
    console = Console(force_terminal=force, no_color=color == "never", highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 160
    return console


def report_table(reports: list[DatasetReport], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    mixed = any(r.used is not None and (r.used != r.kept) for r in reports)  # a mixture drew other than all
    columns = ["dataset", "format", "read", "kept", "truncated", "dropped", "tokens", "sup. kept", "sup. lost",
               "len mean/p95/max"] + (["used/epoch", "sup. used/epoch"] if mixed else [])  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("dataset", "format") else "right")
    for r in reports:
        ln = r.length
        used = [str(r.used), str(r.used_supervised)] if mixed else []
        table.add_row(
            r.name, r.format, str(r.read), str(r.kept), str(r.truncated), str(sum(r.dropped.values())),
            str(r.tokens), str(r.supervised_kept), str(r.supervised_lost),
            f"{ln.get('mean', 0)}/{ln.get('p95', 0)}/{ln.get('max', 0)}", *used,
        )  # fmt: skip
    return table


def print_report(console: Console, reports: list[DatasetReport], title: str) -> None:
    console.print(report_table(reports, title))
    for r in reports:
        for reason, n in sorted(r.dropped.items()):
            console.print(f"  {r.name}: dropped {n} — {reason}", markup=False, highlight=False)
        for note, n in sorted(r.notes.items()):
            console.print(f"  {r.name}: {note}: {n}", markup=False, highlight=False)
        for w in r.warnings:
            console.print(f"  {r.name}: warning — {w}", style="yellow", markup=False, highlight=False)


def marked_example(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> Text:
    """The decoded example, supervised runs in green (colour) or inside [[ ]] (plain)."""
    out = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            piece = tokenizer.decode(input_ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if labels[start] == IGNORE:
                out.append(piece, style="dim" if color else "")
            elif color:
                out.append(piece, style="bold green")
            else:
                out.append(OPEN + piece + CLOSE)
            start = i
    return out
