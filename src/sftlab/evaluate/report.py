"""`sftlab report RUN_DIR`: one self-contained HTML page (charts inlined as PNG data URIs).

Sections: run summary, training curves, the data report, the eval metrics with base-vs-tuned deltas,
and answers side by side. Every string that came from data, a model or a config is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
import json
from html import escape
from pathlib import Path

from sftlab.errors import ConfigError
from sftlab.evaluate.runner import better, interval_text
from sftlab.rundir import read_metrics

MAX_SAMPLES = 30  # rows of side-by-side answers shown per source

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:14px} th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;max-width:360px;word-break:break-word}
.better{color:#137333;font-weight:600} .worse{color:#b3261e;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:13px;color:#555}
.muted{color:#777}
"""

# Lets a test (or a reader) confirm every chart decoded: counts images with a real width.
CHECK = """<script>window.addEventListener('load',function(){var ok=Array.prototype.filter.call(document.images,
function(i){return i.complete&&i.naturalWidth>0}).length;document.body.setAttribute('data-charts-rendered',ok);});</script>"""


def write_report(run_dir: str, output: str | None = None) -> Path:
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run directory (no config.yaml)")
    path = Path(output) if output else run / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run), encoding="utf-8")
    return path


def render(run: Path) -> str:
    summary = _json(run / "summary.json") or {}
    metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    evaluation = _json(run / "eval" / "metrics.json")
    charts = _charts(metrics)
    parts = [
        f"<h1>sftlab report: {escape(run.resolve().name)}</h1>",
        f"<p class=muted>{escape(str(run.resolve()))}</p>",
        "<h2>Run</h2>", _summary_table(summary),
        "<h2>Training curves</h2>",
        '<div class=charts id=charts>' + "".join(charts) + "</div>" if charts else "<p>No metrics.jsonl yet.</p>",
        "<h2>Data</h2>", _data_table(_json(run / "data_report.json") or {}),
        "<h2>Evaluation</h2>", _metrics_table(evaluation), _judge_lines(evaluation),
        _confusion(run / "eval" / "confusion.png"),
        "<h2>Answers side by side</h2>", _samples_table(run / "eval" / "samples.jsonl", evaluation),
    ]
    if (run / "generations.jsonl").is_file():
        parts += ["<h2>Answers during training</h2>", _generations_table(run / "generations.jsonl")]
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>sftlab report: "
            f"{escape(run.resolve().name)}</title><style>{STYLE}</style></head><body>{body}{CHECK}</body></html>")  # fmt: skip


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(r) + "</tr>" for r in rows) + "</table>"


def _num(value, fmt: str = "{:,.4g}", cls: str = "num") -> str:
    text = "" if value is None else fmt.format(value) if isinstance(value, (int, float)) else escape(str(value))
    return f"<td class=\"{cls}\">{text}</td>"


def _text(value) -> str:
    return f"<td class=text>{escape('' if value is None else str(value))}</td>"


def _summary_table(s: dict) -> str:
    if not s:
        return "<p>No summary.json: the run has not finished.</p>"
    keys = ["outcome", "method", "precision", "steps", "train_time_s", "tokens_per_s", "supervised_tokens",
            "trainable_params", "total_params", "first_eval_loss", "final_eval_loss", "best_eval_loss"]  # fmt: skip
    return _table(["key", "value"], [[_text(k), _num(s.get(k))] for k in keys if k in s])


def _charts(metrics: list[dict]) -> list[str]:
    series = {
        "loss": [("loss", "train loss"), ("eval_loss", "eval loss")],
        "learning rate": [("learning_rate", "learning rate")],
        "gradient norm (before clipping)": [("grad_norm", "grad norm")],
        "eval accuracy and F1 (classification)": [("eval_accuracy", "accuracy"), ("eval_f1_macro", "macro F1")],
        "eval BLEU and chrF (seq2seq)": [("eval_bleu", "BLEU"), ("eval_chrf", "chrF")],
        "answers during training (eval.generate_every)": [
            ("gen_bleu", "BLEU"), ("gen_chrf", "chrF"), ("gen_rougeL", "ROUGE-L"), ("gen_exact_match", "exact match")],
    }  # fmt: skip
    per_dataset = sorted({k for m in metrics for k in m if k.startswith("eval_loss/")})
    if per_dataset:  # several eval sets: each one's loss beside the pooled one
        series["eval loss per dataset"] = [("eval_loss", "pooled")] + [(k, k.split("/", 1)[1]) for k in per_dataset]
    charts = []
    for title, lines in series.items():
        points = {label: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))] for k, label in lines}
        points = {label: p for label, p in points.items() if p}
        if points:
            charts.append(f"<figure><img alt='{escape(title)}' src='data:image/png;base64,{_plot(title, points)}'>"
                          f"<figcaption>{escape(title)}</figcaption></figure>")  # fmt: skip
    return charts


def _plot(title: str, points: dict[str, list[tuple]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=90)
    for label, xy in points.items():
        style = "o-" if len(xy) < 30 or label.startswith("eval") else "-"
        ax.plot(*zip(*xy), style, label=label, linewidth=1, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _confusion(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img alt='confusion matrix' src='data:image/png;base64,{data}'><figcaption>confusion matrix</figcaption></figure>"


def _data_table(reports: dict) -> str:
    rows = []
    for split, items in reports.items():
        for r in items:
            dropped = ", ".join(f"{k}: {v}" for k, v in r.get("dropped", {}).items()) or "0"
            length = r.get("length", {})
            rows.append([_text(split), _text(r["name"]), _text(r.get("format", "")), _num(r["read"]), _num(r["kept"]),
                         _num(r["truncated"]), _text(dropped), _num(r["supervised_kept"]), _num(r["supervised_lost"]),
                         _text(f"{length.get('mean', '')} / {length.get('p95', '')} / {length.get('max', '')}"),
                         _num(r.get("used")), _num(r.get("used_supervised")),
                         _text("; ".join(r.get("warnings", [])))])  # fmt: skip
    if not rows:
        return "<p>No data report.</p>"
    header = ["split", "dataset", "format", "read", "kept", "truncated", "dropped", "supervised tokens kept",
              "supervised tokens lost", "length mean / p95 / max", "examples per epoch", "supervised tokens per epoch",
              "warnings"]  # fmt: skip
    return _table(header, rows)


def _metrics_table(evaluation: dict | None) -> str:
    if not evaluation:
        return "<p>No evaluation yet: run <code>sftlab eval RUN_DIR --compare</code>, then this report again.</p>"
    tuned = evaluation["models"]["model"]
    base = evaluation["models"].get("base")
    sources = f"model: {tuned['source']}" + (f"; base: {base['source']}" if base else "")
    rows = []
    for key, value in tuned["metrics"].items():
        row = [_text(key)]
        if base:
            d = evaluation["delta"].get(key)
            cls = "num" if not d else "num better" if better(key, d) else "num worse"
            iv = interval_text(evaluation.get("intervals", {}).get(key))
            row += [_num(base["metrics"].get(key)), _num(value), _num(d, "{:+.4g}", cls), _text(iv)]
        else:
            row.append(_num(value))
        rows.append(row)
    header = ["metric", "base", "tuned", "delta", "95% interval (~: not significant)"] if base else ["metric", "value"]
    note = ("<p class=muted>loss and perplexity: lower is better; every other metric: higher is better (percent; "
            "harness/ metrics on lm-eval's own 0-1 scale).</p>")
    return f"<p class=muted>{escape(sources)} ({escape(evaluation.get('created', ''))})</p>" + _table(header, rows) + note


def _judge_lines(evaluation: dict | None) -> str:
    """The LLM judge's grades, win rate and agreement with human ratings, as `sftlab eval --judge` printed them."""
    if not evaluation or not evaluation.get("judge"):
        return ""
    from sftlab.evaluate.judge import format_judge

    return f"<h3>LLM judge</h3><pre>{escape(format_judge(evaluation['judge']))}</pre>"


def _samples_table(path: Path, evaluation: dict | None) -> str:
    if not path.is_file():
        return "<p>No answers yet (written by <code>sftlab eval</code>).</p>"
    rows, shown = [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        shown[s["source"]] = shown.get(s["source"], 0) + 1
        if shown[s["source"]] <= MAX_SAMPLES:
            rows.append([_text(s["source"]), _text(s["prompt"]), _text(s.get("reference")),
                         _text(s.get("base_answer", "")), _text(s.get("answer"))])  # fmt: skip
    has_base = bool(evaluation and "base" in evaluation["models"])
    header = ["source", "prompt", "reference", "base answer" if has_base else "", "tuned answer"]
    return _table(header, rows) + f"<p class=muted>first {MAX_SAMPLES} per source; all in {escape(str(path))}</p>"


def _generations_table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = sorted({r["step"] for r in rows})
    first, last = steps[0], steps[-1]
    by_prompt: dict[str, dict] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], {"reference": r["reference"]})[r["step"]] = r["answer"]
    table = [[_text(p), _text(v["reference"]), _text(v.get(first, "")), _text(v.get(last, ""))] for p, v in by_prompt.items()]
    return _table(["prompt", "reference", f"answer at step {first}", f"answer at step {last}"], table)
