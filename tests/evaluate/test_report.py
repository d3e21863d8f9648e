"""`sftlab report`: a self-contained HTML page that renders in headless Chromium, with text escaped."""

import os
import re
import shutil
import subprocess

import pytest
from conftest import tiny_config, write_jsonl

from sftlab.cli import main
from sftlab.evaluate.runner import write_results
from sftlab.loop.train import train

EVIL = "<script>alert('x')</script><b>bold</b> & 你好"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("report")
    data = write_jsonl(tmp / "data.jsonl", [{"messages": [{"role": "user", "content": f"{EVIL} {i}"},
                                                          {"role": "assistant", "content": f"reply {i}"}]}
                                            for i in range(12)])  # fmt: skip
    cfg = tiny_config(tiny_model_dir, tmp / "run", f"data.eval=[{data}]", "train.eval_steps=2",
                      "eval.generate_every=3", "eval.generate_examples=2", "eval.max_new_tokens=4", data=data)  # fmt: skip
    train(cfg, say=lambda *a, **k: None)
    record = {"created": "now", "models": {"model": {"source": "run", "metrics": {"eval/loss": 1.0, "eval/bleu": 30.0}},
                                           "base": {"source": "base", "metrics": {"eval/loss": 1.5, "eval/bleu": 40.0}}},
              "delta": {"eval/loss": -0.5, "eval/bleu": -10.0}}  # fmt: skip
    write_results(tmp / "run" / "eval", record, [{"source": "data.eval", "prompt": EVIL, "reference": EVIL,
                                                  "answer": EVIL, "base_answer": "plain"}])  # fmt: skip
    return tmp / "run"


def test_report_escapes_text_and_marks_better_and_worse(run_dir):
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "你好" in html
    assert len(re.findall(r"<script>", html)) == 1  # only the page's own render check
    assert 'class="num better">-0.5' in html and 'class="num worse">-10' in html
    assert "src='http" not in html and 'src="http' not in html  # self-contained: images are data URIs
    for section in ("Training curves", "Data", "Evaluation", "Answers side by side", "Answers during training"):
        assert f"<h2>{section}</h2>" in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_with_its_charts_in_headless_chromium(run_dir, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("SFTLAB_REQUIRE_CHROMIUM"):
            pytest.fail("SFTLAB_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it: apt-get install chromium)")
    page = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--output", str(page)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    charts = len(re.findall(r"<img alt=", (run_dir / "report.html").read_text()))
    assert charts == 4  # loss, learning rate, grad norm, answers during training
    assert f'data-charts-rendered="{charts}"' in dom
    assert "<script>alert" not in dom and "&lt;script&gt;alert('x')" in dom  # shown as text, never run
    shot = tmp_path / "shot.png"
    subprocess.run([exe, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.stat().st_size > 20_000  # a page with text and charts, not a blank one


def test_report_of_a_run_without_eval_says_what_to_run(tmp_path, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "train.max_steps=2")
    train(cfg, say=lambda *a, **k: None)
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "sftlab eval RUN_DIR --compare" in html


def test_report_needs_a_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_the_judges_verdicts_are_in_the_report(tmp_path):
    from sftlab.evaluate.report import render
    from sftlab.evaluate.runner import write_results

    judge = {"judge": {"endpoint": "http://judge/v1", "model": EVIL, "template": "sftlab-judge-1", "requests": 8,
                       "cached": 0, "failed": 0, "unparsed": 0},
             "single": {"n": 2, "model": 7.5, "base": 5.0, "missing_model": 0, "missing_base": 0, "delta": 2.5,
                        "interval": {"low": 1.0, "high": 4.0, "significant": True}},
             "pairwise": {"n": 2, "wins": 2, "losses": 0, "ties": 0, "win_rate": 1.0, "interval": [1.0, 1.0],
                          "significant": True, "inconsistent": 0, "missing": 0},
             "agreement": {"kappa": 0.5, "n": 4, "items": 2, "observed": 0.75}}  # fmt: skip
    record = {"created": "now", "models": {"model": {"source": "run", "metrics": {"eval/bleu": 30.0}}}, "delta": {},
              "judge": judge}  # fmt: skip
    write_results(tmp_path / "eval", record, [])
    html = render(tmp_path)
    assert "<h3>LLM judge</h3>" in html and "win rate 1.000" in html and "Cohen&#x27;s kappa 0.500" in html
    assert "<script>alert" not in html  # the judge's model id is escaped like any text
