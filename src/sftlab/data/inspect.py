"""Human-readable views of a tokenized split: the report table and examples with the loss mask shown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sftlab.data.tokenize import IGNORE, DatasetReport

OPEN, CLOSE = "[[", "]]"  # marks supervised text when colour is off


def report_console(color: str = "auto") -> Console:
    """A console for reports: `color` auto|always|never; 160 columns when not a terminal (pipes, logs)."""
    force = {"always": True, "never": False}.get(color)
    console = Console(force_terminal=force, no_color=color == "never", highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 160
    return console


def report_table(reports: list[DatasetReport], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("dataset", "format", "read", "kept", "truncated", "dropped", "tokens",
                "sup. kept", "sup. lost", "len mean/p95/max"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("dataset", "format") else "right")
    for r in reports:
        ln = r.length
        table.add_row(
            r.name, r.format, str(r.read), str(r.kept), str(r.truncated), str(sum(r.dropped.values())),
            str(r.tokens), str(r.supervised_kept), str(r.supervised_lost),
            f"{ln.get('mean', 0)}/{ln.get('p95', 0)}/{ln.get('max', 0)}",
        )  # fmt: skip
    return table


def print_report(console: Console, reports: list[DatasetReport], title: str) -> None:
    console.print(report_table(reports, title))
    for r in reports:
        for reason, n in sorted(r.dropped.items()):
            console.print(f"  {r.name}: dropped {n} — {reason}", markup=False, highlight=False)
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
