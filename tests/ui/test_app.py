"""`sftlab ui`: runs dashboard, blind rating, results, and its safety; end to end in headless Chromium."""

import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import FIXTURES, tiny_config, write_jsonl

from sftlab.evaluate.runner import write_results
from sftlab.loop.train import train
from sftlab.ui.runs import overview
from sftlab.ui.store import DIMENSIONS

XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"

GOLD = [{"prompt": "What is 2 + 2?", "good": "2 + 2 = 4.", "bad": "2 + 2 = 5."},
        {"prompt": "Name the capital of France.", "good": "Paris.", "bad": "Banana."}]  # fmt: skip


def _samples():
    # Every pair carries the payload, so every page the test rates shows it (as text, never run).
    return [{"source": "data.eval", "prompt": f"question {i}", "reference": f"ref {i}", "answer": f"tuned answer {i}",
             "base_answer": f"base answer {i} {XSS}"} for i in range(6)]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model_dir):
    """runs/ with a finished run that has base-vs-tuned samples, a live run and a killed one; a gold file."""
    tmp = tmp_path_factory.mktemp("ui")
    runs = tmp / "runs"
    cfg = tiny_config(tiny_model_dir, runs / "tuned", "train.max_steps=4", f"data.eval=[{FIXTURES / 'train_small.jsonl'}]",
                      "train.eval_steps=2")  # fmt: skip
    train(cfg, say=lambda *a, **k: None)
    record = {"created": "now", "models": {"model": {"source": "runs/tuned", "metrics": {"eval/loss": 1.0}},
                                           "base": {"source": "tiny", "metrics": {"eval/loss": 1.5}}},
              "delta": {"eval/loss": -0.5}}  # fmt: skip
    write_results(runs / "tuned" / "eval", record, _samples())
    live = runs / "live"
    live.mkdir()
    (live / "config.yaml").write_text(f"model:\n  name: '{XSS}'\ntrain:\n  method: lora\n")
    (live / "status.json").write_text(json.dumps({"status": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                                  "total_steps": 100}))  # fmt: skip
    write_jsonl(live / "metrics.jsonl", [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0}
                                         for s in range(1, 6)])  # fmt: skip
    dead = runs / "killed"
    dead.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (dead / "status.json").write_text(json.dumps({"status": "running", "pid": int(gone.stdout),
                                                  "host": socket.gethostname()}))  # fmt: skip
    write_jsonl(tmp / "gold.jsonl", GOLD)
    return tmp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sftlab ui` as its own process, as a user runs it."""

    def __init__(self, root, db, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sftlab", "ui", str(root / "runs"), "--port", str(self.port), "--db", str(db),
               "--gold", str(root / "gold.jsonl"), *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/api/runs", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
        raise RuntimeError("sftlab ui did not start")

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


def _study(url: str) -> dict:
    return httpx.get(url + "/api/studies").json()["studies"][0]


def _rate(url, study, name, item, preference, left=3, right=3):
    body = {"annotator": name, "item": item, "preference": preference, "seconds": 1.0,
            "left": dict.fromkeys(DIMENSIONS, left), "right": dict.fromkeys(DIMENSIONS, right)}  # fmt: skip
    return httpx.post(f"{url}/api/studies/{study}/ratings", json=body, timeout=30)


def _next(url, study, name):
    return httpx.get(f"{url}/api/studies/{study}/next", params={"annotator": name}, timeout=30).json()


def test_run_status_from_training_and_from_a_killed_process(root, tiny_model_dir, tmp_path):
    tuned = overview("tuned", root / "runs" / "tuned")
    assert tuned["status"] == "finished" and tuned["step"] == 4 and tuned["total_steps"] == 4
    assert overview("live", root / "runs" / "live")["status"] == "running"
    killed = overview("killed", root / "runs" / "killed")
    assert killed["status"] == "failed" and "ended without finishing" in killed["error"]
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(Exception):
        train(tiny_config(tiny_model_dir, tmp_path / "run", data=bad), say=lambda *a, **k: None)
    failed = overview("run", tmp_path / "run")
    assert failed["status"] == "failed" and "bad.jsonl:1: malformed JSON" in failed["error"]


@pytest.fixture
def client(root, tmp_path):
    from fastapi.testclient import TestClient

    from sftlab.ui.app import Settings, create_app
    from sftlab.ui.studies import load_gold

    app = create_app(Settings(root / "runs", tmp_path / "r.sqlite", gold=load_gold(root / "gold.jsonl")))
    return TestClient(app, base_url="http://127.0.0.1")


def test_api_lists_runs_and_the_base_vs_tuned_study(client):
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(runs) == {"tuned", "live", "killed"}
    details = client.get("/api/runs/tuned").json()
    assert "model:" in details["config"] and details["eval"]["delta"]["eval/loss"] == -0.5
    assert details["data_report"]["train"][0]["kept"] > 0
    got = client.get("/api/runs/live/metrics", params={"offset": 3}).json()
    assert [r["step"] for r in got["rows"]] == [4, 5] and got["next"] == 5 and not got["reset"]
    study = client.get("/api/studies").json()["studies"][0]
    assert (study["items"], study["gold_items"]) == (6, 2)
    assert study["model_a"] == "tuned (runs/tuned)" and study["model_b"] == "base (tiny)"
    item = client.get(f"/api/studies/{study['id']}/next", params={"annotator": "ann"}).json()
    assert set(item) == {"done", "item", "prompt", "left", "right", "progress"}  # no model names, no gold flag


def test_path_traversal_is_refused(client, root):
    outside = root / "secret.txt"
    outside.write_text("TOP SECRET")
    (root / "runs" / "tuned" / "eval" / "link.html").symlink_to(outside)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "config.yaml").write_text("task: causal_lm\n")
    (elsewhere / "report.html").write_text("TOP SECRET")
    os.symlink(elsewhere, root / "runs" / "escape")  # a symlinked run outside the runs dir is not listed
    try:
        for path in ["/api/runs/..%2F..%2Fsecret.txt", "/api/runs/../../secret.txt/metrics", "/runs/..%2F/report",
                     "/runs/%2e%2e/report", "/static/..%2Fapp.py", "/static/../store.py", "/api/runs/escape",
                     "/runs/escape/report", "/static/%2e%2e%2fruns.py"]:  # fmt: skip
            r = client.get(path)
            assert r.status_code in (404, 400) and "TOP SECRET" not in r.text and "import" not in r.text, path
        from sftlab.ui.runs import find_runs, run_file

        runs = find_runs(root / "runs")
        assert run_file(runs, "tuned", "eval", "link.html") is None  # resolves outside the run
        assert run_file(runs, "tuned", "..", "..", "secret.txt") is None
    finally:
        (root / "runs" / "tuned" / "eval" / "link.html").unlink()
        (root / "runs" / "escape").unlink()


def test_token_host_content_type_and_size_limits(root, tmp_path):
    from fastapi.testclient import TestClient

    from sftlab.ui.app import Settings, create_app

    open_app = TestClient(create_app(Settings(root / "runs", tmp_path / "a.sqlite")), base_url="http://127.0.0.1")
    assert open_app.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding
    study = open_app.get("/api/studies").json()["studies"][0]["id"]
    url = f"/api/studies/{study}/ratings"
    assert open_app.post(url, content="{}", headers={"Content-Type": "text/plain"}).status_code == 415
    big = json.dumps({"annotator": "x" * 70_000})
    assert open_app.post(url, content=big, headers={"Content-Type": "application/json"}).status_code == 413
    chunked = open_app.post(url, content=iter([b"{" + b" " * 40_000, b" " * 40_000 + b"}"]),
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413
    page = open_app.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"] and "http" not in page.text.split("<main>")[0]

    locked = TestClient(create_app(Settings(root / "runs", tmp_path / "b.sqlite", token="s3cret")),
                        base_url="http://sftlab.lan")  # fmt: skip
    assert locked.get("/api/runs").status_code == 401
    assert locked.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert locked.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    landing = locked.get("/run?name=tuned&token=s3cret", follow_redirects=False)
    assert landing.status_code == 303 and landing.headers["location"] == "/run?name=tuned"
    odd = locked.get("http://sftlab.lan//evil.example/x?a=1%262&token=s3cret", follow_redirects=False)
    assert odd.headers["location"] == "/evil.example/x?a=1%262"  # stays on this site, query kept intact
    assert "httponly" in landing.headers["set-cookie"].lower()
    assert locked.get("/api/runs").status_code == 200  # the cookie now carries the token


def test_cli_refuses_a_missing_dir_and_names_a_bad_comparison_line(tmp_path, capsys, root):
    from sftlab.cli import main

    assert main(["ui", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": "p", "answer_a": "x", "answer_b": "y"}, {"prompt": "p"}])
    assert main(["ui", str(root / "runs"), "--compare", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def test_a_public_bind_gets_a_token(root, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sftlab", "ui", str(root / "runs"), "--host", "0.0.0.0",
                             "--port", str(port), "--db", str(tmp_path / "t.sqlite")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        line = ""
        while "sftlab ui on" not in line:
            line = proc.stdout.readline()
            assert line, "sftlab ui exited"
        assert "?token=" in line
        token = line.split("?token=")[1].split()[0]
        for _ in range(100):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/runs")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert r.status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_two_annotators_at_once_and_a_killed_server_lose_nothing(root, tmp_path):
    db = tmp_path / "ratings.sqlite"
    server = Server(root, db)
    try:
        study = _study(server.url)["id"]
        done = {}

        def annotate(name, pref):
            count = 0
            while not (nxt := _next(server.url, study, name))["done"]:
                assert _rate(server.url, study, name, nxt["item"], pref, left=1 + count % 5).status_code == 200
                count += 1
            done[name] = count

        threads = [threading.Thread(target=annotate, args=(n, p)) for n, p in (("ann", "left"), ("bob", "right"))]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert done == {"ann": 8, "bob": 8}
        item = _next(server.url, study, "cyd")["item"]
        assert _rate(server.url, study, "cyd", item, "tie").status_code == 200
        again = _rate(server.url, study, "cyd", item, "left")
        assert again.status_code == 409 and "already rated" in again.json()["error"]["message"]
        server.stop(signal.SIGKILL)  # no shutdown hook runs: only what was committed survives
        rows = sqlite3.connect(db).execute("SELECT annotator, COUNT(*) FROM ratings GROUP BY annotator").fetchall()
        assert dict(rows) == {"ann": 8, "bob": 8, "cyd": 1}
        (jmode,) = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()
        assert jmode == "wal"
        server = Server(root, db)
        assert _next(server.url, study, "cyd")["progress"] == {"done": 1, "total": 8}
        assert _study(server.url)["ratings"] == 17
    finally:
        server.stop()


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("SFTLAB_REQUIRE_CHROMIUM"):
            pytest.fail("SFTLAB_REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it: apt-get install chromium)")
    return exe


def test_dashboard_rating_and_results_in_headless_chromium(root, tmp_path):
    from playwright.sync_api import sync_playwright

    exe = _chromium()
    db = tmp_path / "ratings.sqlite"
    server = Server(root, db)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _dashboard_and_live_chart(page, server.url, root)
            shown = _rate_five(page, server.url)
            _check_rows(db, shown)
            _results_page(page, server.url, db)
            assert page.evaluate("() => window.__xss") is None and not errors
            browser.close()
    finally:
        server.stop()


def _dashboard_and_live_chart(page, url, root):
    page.goto(url + "/")
    page.wait_for_selector("tr[data-run='live'] .status.running")
    assert page.inner_text("tr[data-run='killed'] .status") == "failed"
    assert page.inner_text("tr[data-run='tuned'] .status") == "finished"
    page.click("tr[data-run='live'] a")
    page.wait_for_selector("#chart-loss[data-points='5']")
    with open(root / "runs" / "live" / "metrics.jsonl", "a") as f:  # the run trains on
        f.write(json.dumps({"step": 6, "loss": 0.4, "learning_rate": 1e-4, "grad_norm": 0.9}) + "\n")
        f.write(json.dumps({"step": 6, "eval_loss": 0.5}) + "\n")
    page.wait_for_selector("#chart-loss[data-points='7']", timeout=15_000)  # new train and eval points drawn
    assert page.get_attribute("#chart-grad", "data-points") == "6"
    page.goto(url + "/run?name=tuned")
    page.wait_for_selector("#report-link[hidden]", state="attached")
    page.wait_for_selector("#eval tbody tr")
    assert "eval/loss" in page.inner_text("#eval")


def _rate_five(page, url) -> list[dict]:
    """Rate five comparisons: three by keys, two by clicks. Returns what was entered on screen."""
    study = _study(url)["id"]
    page.goto(f"{url}/rate?study={study}")
    page.fill("#name", "alice")
    page.press("#name", "Enter")
    shown = []
    for n in range(5):
        page.wait_for_selector(f"#progress-text:has-text('{n} of 8 rated')")
        left, right = page.inner_text("#answer-left"), page.inner_text("#answer-right")
        pref = ["left", "right", "tie", "left", "right"][n]
        left_scores, right_scores = [1 + (n + i) % 5 for i in range(4)], [5 - (n + i) % 5 for i in range(4)]
        if n < 3:
            page.keyboard.type("".join(map(str, left_scores + right_scores)) + {"left": "a", "right": "b", "tie": "t"}[pref])
            page.keyboard.press("Enter")
        else:
            for side, values in (("left", left_scores), ("right", right_scores)):
                for dim, v in zip(DIMENSIONS, values):
                    page.click(f"td[data-side='{side}'][data-dim='{dim}'] button[data-v='{v}']")
            page.click(f"button.pref[data-pref='{pref}']")
            page.click("#submit")
        shown.append({"left": left, "right": right, "pref": pref, "scores": {"left": left_scores, "right": right_scores}})
    page.wait_for_selector("#progress-text:has-text('5 of 8 rated')")
    gold = {g["good"] for g in GOLD} | {g["bad"] for g in GOLD}
    for s in shown:  # the payload shows as text on every non-gold pair
        assert s["left"] in gold or XSS in s["left"] + s["right"]
    return shown


def _check_rows(db, shown):
    rows = sqlite3.connect(db).execute(
        "SELECT i.answer_a, i.answer_b, r.preference, r.left_is_a, "
        + ", ".join(f"r.{d}_a, r.{d}_b" for d in DIMENSIONS)
        + " FROM ratings r JOIN items i ON i.id = r.item WHERE r.annotator = 'alice' ORDER BY r.id").fetchall()  # fmt: skip
    assert len(rows) == 5
    for row, s in zip(rows, shown):
        answer_a, answer_b, preference, left_is_a = row[:4]
        assert {s["left"], s["right"]} == {answer_a, answer_b}  # the page showed the item's two answers, as text
        assert left_is_a == (s["left"] == answer_a)
        side_of = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a", "tie": "tie"}
        assert preference == side_of[s["pref"]]
        by_side = {"a": s["scores"]["left" if left_is_a else "right"], "b": s["scores"]["right" if left_is_a else "left"]}
        assert [row[4 + 2 * i] for i in range(4)] == by_side["a"] and [row[5 + 2 * i] for i in range(4)] == by_side["b"]


def _results_page(page, url, db):
    study = _study(url)["id"]
    for n in range(8):  # a second rater, by the API
        nxt = _next(url, study, "bob")
        assert _rate(url, study, "bob", nxt["item"], "left" if n % 2 else "tie").status_code == 200
    page.goto(f"{url}/results?study={study}")
    page.wait_for_selector("#win-rate:not(:empty)")
    con = sqlite3.connect(db)
    rows = con.execute("SELECT r.annotator, r.item, r.preference, r.helpfulness_a FROM ratings r "
                       "JOIN items i ON i.id = r.item WHERE i.gold IS NULL").fetchall()  # fmt: skip
    wins, ties, n = sum(r[2] == "a" for r in rows), sum(r[2] == "tie" for r in rows), len(rows)
    p = (wins + ties / 2) / n
    z = 1.959963984540054
    center, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert page.inner_text("#win-rate") == f"{100 * p:.1f}%"
    assert page.inner_text("#win-ci") == f"{100 * max(0, center - half):.1f}% – {100 * min(1, center + half):.1f}%"
    assert page.inner_text("#a-wins") == str(wins) and page.inner_text("#ties") == str(ties)
    mean = sum(r[3] for r in rows) / n
    assert page.inner_text("#score-helpfulness-a").startswith(f"{mean:.2f}")
    alice = {r[1]: r[2] for r in rows if r[0] == "alice"}
    bob = {r[1]: r[2] for r in rows if r[0] == "bob"}
    both = [(alice[i], bob[i]) for i in alice if i in bob]
    po = sum(x == y for x, y in both) / len(both)
    pe = sum((sum(x == c for x, _ in both) / len(both)) * (sum(y == c for _, y in both) / len(both)) for c in ("a", "b", "tie"))
    value = page.get_attribute("#agreement", "data-value")
    assert "Cohen's kappa" in page.inner_text("#agreement")
    assert (value == "" and pe == 1) or float(value) == pytest.approx((po - pe) / (1 - pe))
    import csv
    import io

    exported = list(csv.DictReader(io.StringIO(httpx.get(f"{url}/api/studies/{study}/export.csv").text)))
    assert len(exported) == 13 and {r["annotator"] for r in exported} == {"alice", "bob"}
    assert {r["preferred"] for r in exported} <= {"tuned (runs/tuned)", "base (tiny)", "tie"}
    assert len(httpx.get(f"{url}/api/studies/{study}/export.json").json()["ratings"]) == 13


def test_the_shipped_gold_file_loads():
    from conftest import ROOT

    from sftlab.ui.studies import load_gold

    gold = load_gold(ROOT / "examples" / "ui" / "gold.jsonl")
    assert len(gold) == 8 and all(p.gold == "a" and p.answer_a != p.answer_b for p in gold)
