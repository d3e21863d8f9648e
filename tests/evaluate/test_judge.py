"""The LLM judge: a stub OpenAI-compatible judge (httpx.MockTransport) for the rules, the cache and agreement
with `sftlab ui` ratings; a closed port for the unreachable endpoint; a live `sftlab serve` as the judge."""

import json
import re
import socket

import httpx
import pytest

from sftlab.errors import ConfigError
from sftlab.evaluate import judge as J
from sftlab.evaluate.significance import interval, mean_scores

TAG = re.compile(r"<(reply|reply_a|reply_b)>\n(.*?)\n</\1>", re.DOTALL)


def stub_grade(answer: str) -> int:
    return min(10, 1 + len(answer) // 5)


class StubJudge:
    """An OpenAI-compatible judge answering from the content: grades by length, prefers the longer reply
    (mode "longer") or always says A (mode "always_a"). Prompts steer the odd cases: MUMBLE answers without
    a verdict until the follow-up, SILENT never gives one, FLAKY fails with 503 once, BROKEN always 500;
    after `crash_after` chat requests it raises (an interrupted run)."""

    def __init__(self, mode="longer", models=("stub-judge", "other"), crash_after=None, prefix=""):
        self.mode, self.models, self.crash_after, self.prefix = mode, models, crash_after, prefix
        self.chats, self.flaked = [], set()

    def transport(self):
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if not path.startswith(self.prefix):
            return httpx.Response(404, json={"error": "not here"})
        if path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        body = json.loads(request.content)
        if self.crash_after is not None and len(self.chats) >= self.crash_after:
            raise RuntimeError("the judging run is killed")
        self.chats.append(body)
        assert body["temperature"] == 0 and body["max_tokens"] <= J.MAX_TOKENS
        user = body["messages"][1]["content"]
        if "BROKEN" in user:
            return httpx.Response(500, text="internal error")
        if "FLAKY" in user and user not in self.flaked:
            self.flaked.add(user)
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant",
                                                                  "content": self.reply(body["messages"])}}]})  # fmt: skip

    def reply(self, messages) -> str:
        user, follow_up = messages[1]["content"], len(messages) > 2
        if "SILENT" in user or ("MUMBLE" in user and not follow_up):
            return "Both have merits; hard to say. Rating: maybe?"
        replies = dict(TAG.findall(user))
        if "reply" in replies:
            return f"Clear enough.\nRating: [[{stub_grade(replies['reply'])}]]"
        a, b = replies["reply_a"], replies["reply_b"]
        if self.mode == "always_a":
            return "A reads better.\n[[A]]"
        return "Verdict below.\n" + ("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")


def row(prompt, answer, base, reference="ref"):
    return {"source": "data.eval", "prompt": prompt, "messages": [{"role": "user", "content": prompt}],
            "reference": reference, "answer": answer, "base_answer": base}  # fmt: skip


ROWS = [row("q1", "a long tuned answer", "short"), row("q2", "tuned wins again here", "meh"),
        row("q3", "and a third longer one", "no"), row("q4", "tiny", "the base is longer"),
        row("q5", "same size", "equal len"), row("q6", "identical", "identical")]  # fmt: skip


def run(rows, stub, **kw):
    kw.setdefault("say", lambda *a: None)
    kw.setdefault("progress", False)
    return J.judge_samples(rows, "http://judge.test/v1", transport=stub.transport(), **kw)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(J, "BACKOFF_S", 0.0)


def test_longer_answer_judge_counts_wins_losses_ties_and_grades():
    stub = StubJudge()
    rec = run(ROWS, stub)
    assert rec["judge"] == {"endpoint": "http://judge.test/v1", "model": "stub-judge", "template": J.TEMPLATE,
                            "requests": len(stub.chats), "cached": 0, "failed": 0, "unparsed": 0}  # fmt: skip
    p = rec["pairwise"]
    counts = [p[k] for k in ("n", "wins", "losses", "ties", "inconsistent", "flips", "missing")]
    assert counts == [6, 3, 1, 2, 0, 0, 0]
    assert p["win_rate"] == pytest.approx((3 + 2 / 2) / 6)
    assert p["interval"][0] <= p["win_rate"] <= p["interval"][1] and 0 <= p["interval"][0] and p["interval"][1] <= 1
    points = [1, 1, 1, 0, 0.5, 0.5]  # the same paired bootstrap significance.py gives, shifted by the coin's 0.5
    iv = interval(mean_scores([0.5] * 6), mean_scores(points))
    assert p["interval"] == pytest.approx([iv["low"] + 0.5, iv["high"] + 0.5]) and p["significant"] == iv["significant"]
    s = rec["single"]
    tuned, base = [stub_grade(r["answer"]) for r in ROWS], [stub_grade(r["base_answer"]) for r in ROWS]
    assert s["model"] == pytest.approx(sum(tuned) / 6) and s["base"] == pytest.approx(sum(base) / 6)
    assert s["delta"] == pytest.approx((sum(tuned) - sum(base)) / 6) and s["paired"] == 6
    assert s["interval"]["low"] <= s["delta"] <= s["interval"]["high"]
    assert [it["grade"] for it in rec["items"]] == [{"model": t, "base": b} for t, b in zip(tuned, base)]
    assert [it["verdict"] for it in rec["items"]] == ["tuned", "tuned", "tuned", "base", "tie", "tie"]
    assert [it["index"] for it in rec["items"]] == list(range(6))
    # Identical answers: one grade request serves both, and no pairwise request at all.
    asked = [m["messages"][1]["content"] for m in stub.chats]
    assert len(asked) == len(set(asked)) == 6 * 4 - 3
    text = J.format_judge(rec)
    assert "tuned wins 3, base wins 1, ties 2" in text and "stub-judge" in text


def test_a_judge_that_always_says_a_cancels_to_ties_counted_inconsistent():
    rec = run(ROWS[:5], StubJudge("always_a"))
    p = rec["pairwise"]
    assert (p["wins"], p["losses"], p["ties"], p["inconsistent"], p["flips"]) == (0, 0, 5, 5, 5)
    assert p["win_rate"] == 0.5 and p["interval"] == [0.5, 0.5] and not p["significant"]
    assert all(it["orders"] == ["tuned", "base"] for it in rec["items"])


def test_a_clear_winner_is_significant():
    rows = [row(f"q{i}", f"a much longer tuned answer {i}", "no") for i in range(12)]
    p = run(rows, StubJudge())["pairwise"]
    assert p["win_rate"] == 1.0 and p["interval"] == [1.0, 1.0] and p["significant"]


def test_unparseable_replies_get_one_follow_up_then_count_as_missing():
    stub = StubJudge()
    rows = [row("MUMBLE q", "tuned answer here", "base"), row("SILENT q", "tuned answer here", "base"), ROWS[0]]
    rec = run(rows, stub)
    mumble, silent, fine = rec["items"]
    assert mumble["grade"] == {"model": stub_grade("tuned answer here"), "base": stub_grade("base")}
    assert mumble["verdict"] == "tuned"
    assert silent["grade"] == {"model": None, "base": None} and silent["orders"] == [None, None]
    assert silent["verdict"] is None and fine["verdict"] == "tuned"
    follow_ups = [m for m in stub.chats if len(m["messages"]) == 4]
    assert len(follow_ups) == 8  # each of MUMBLE's and SILENT's four judgments, once; never a second follow-up
    assert all(m["messages"][3]["content"] in (J.SINGLE_NUDGE, J.PAIR_NUDGE) for m in follow_ups)
    s, p = rec["single"], rec["pairwise"]
    assert (s["missing_model"], s["missing_base"], s["paired"]) == (1, 1, 2)
    assert (p["n"], p["missing"], rec["judge"]["unparsed"], rec["judge"]["failed"]) == (2, 1, 4, 0)
    assert "missing 1 tuned, 1 base" in J.format_judge(rec)


@pytest.mark.parametrize("reply, grade", [
    ("Good.\nRating: [[7]]", 7), ("[[3]] at first, on reflection [[8]]", 8), ("Rating: [[ 9.5 ]]", 9.5),
    ("Rating: 6", 6), ("**Rating:** [4]", 4), ("Rating: [[7/10]]", 7), ("Rating: [[11]]", None), ("[[0]]", None),
    ("no grade", None), ("", None), (None, None), ("<think>[[2]] maybe</think>Rating: [[6]]", 6),
])  # fmt: skip
def test_grade_parsing(reply, grade):
    assert J.parse_grade(reply) == grade


@pytest.mark.parametrize("reply, verdict", [
    ("[[A]]", "A"), ("B is better.\n[[B]]", "B"), ("[[c]]", "C"), ("[[tie]]", "C"), ("Verdict: B", "B"),
    ("Output [[A]], [[B]] or [[C]]... so: [[B]]", "B"), ("A is nicer", None), ("[[D]]", None), (None, None),
])  # fmt: skip
def test_verdict_parsing(reply, verdict):
    assert J.parse_verdict(reply) == verdict


def test_connection_errors_and_5xx_are_retried_and_a_failing_request_is_missing_not_cached(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    rows = [row("FLAKY q", "tuned answer here", "base"), row("BROKEN q", "tuned answer", "b"), ROWS[0]]
    first = run(rows, StubJudge(), cache=cache)
    flaky, broken, fine = first["items"]
    assert flaky["verdict"] == "tuned" and fine["verdict"] == "tuned"  # a 503 then an answer: retried
    assert broken["grade"] == {"model": None, "base": None} and broken["verdict"] is None
    assert first["judge"]["failed"] == 4 and first["pairwise"]["missing"] == 1
    again = StubJudge()
    run(rows, again, cache=cache)
    assert {m["messages"][1]["content"].count("BROKEN") for m in again.chats} == {1}  # only the failed are asked


def test_every_request_failing_is_one_clear_error():
    with pytest.raises(ConfigError, match="every request failed; the first: HTTP 500"):
        run([row("BROKEN q", "x", "y")], StubJudge())


def test_a_second_run_asks_nothing(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    first = run(ROWS, StubJudge(), cache=cache)
    stub = StubJudge()
    second = run(ROWS, stub, cache=cache)
    assert stub.chats == [] and second["judge"]["requests"] == 0 and second["judge"]["cached"] > 0
    for key in ("single", "pairwise", "items"):
        assert second[key] == first[key]
    entry = json.loads(cache.read_text().splitlines()[0])
    assert set(entry) == {"key", "model", "template", "reply"} and entry["template"] == J.TEMPLATE


def test_an_interrupted_run_resumes_asking_only_the_rest(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    whole = StubJudge()
    reference = run(ROWS, whole)
    crashed = StubJudge(crash_after=9)
    with pytest.raises(RuntimeError, match="killed"):
        run(ROWS, crashed, cache=cache, workers=1)
    assert len(cache.read_text().splitlines()) == 9
    with open(cache, "a") as f:
        f.write('{"key": "cut sho')  # the kill landed mid-write: the line is skipped
    rest = StubJudge()
    resumed = run(ROWS, rest, cache=cache)
    assert len(rest.chats) == len(whole.chats) - 9 and resumed["judge"]["cached"] >= 9
    asked = {json.dumps(m["messages"]) for m in crashed.chats}
    assert len(asked) == 9 and not asked & {json.dumps(m["messages"]) for m in rest.chats}
    assert {k: resumed[k] for k in ("single", "pairwise")} == {k: reference[k] for k in ("single", "pairwise")}


def test_another_judge_model_or_template_is_another_cache_entry(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    run(ROWS[:2], StubJudge(), cache=cache)
    other = StubJudge()
    rec = run(ROWS[:2], other, model="other", cache=cache)
    assert rec["judge"]["model"] == "other" and len(other.chats) == 8
    key = J.cache_key("stub-judge", [{"role": "user", "content": "x"}])
    assert key != J.cache_key("other", [{"role": "user", "content": "x"}])


def test_cohen_kappa_equals_the_hand_computation():
    pairs = [("tuned", "tuned"), ("tuned", "tuned"), ("tuned", "base"), ("base", "base"), ("base", "tie"),
             ("tie", "tie"), ("tuned", "tuned"), ("base", "base")]  # fmt: skip
    # observed 6/8; judge tuned/base/tie = 4/3/1, human 3/3/2: chance (12 + 9 + 2) / 64; kappa 25/41
    assert J.cohen_kappa(pairs) == pytest.approx(25 / 41)
    assert J.cohen_kappa([("tie", "tie")] * 3) is None
    assert J.cohen_kappa([("tuned", "base"), ("base", "tuned")]) == pytest.approx(-1.0)


def _rate(store, study, annotator, prefs: dict[str, str]):
    """Rate every item of `annotator`'s queue: prefs maps a prompt to the answer text preferred ('' = tie)."""
    scores = {d: 3 for d in ("helpfulness", "accuracy", "fluency", "harmlessness")}
    while not (nxt := store.next_item(study, annotator))["done"]:
        want = prefs.get(nxt["prompt"], "")
        side = "left" if want == nxt["left"] else "right" if want == nxt["right"] else "tie"
        store.rate(study, annotator, nxt["item"], side, {"left": scores, "right": scores})


def test_agreement_with_ui_ratings_of_the_same_comparisons(tmp_path):
    from sftlab.ui.store import Pair, Store
    from sftlab.ui.studies import sync_studies

    runs = tmp_path / "runs #1?"  # the store is opened by URI: these must be escaped
    (runs / "quick" / "eval").mkdir(parents=True)
    (runs / "quick" / "config.yaml").write_text("task: causal_lm\n")
    rows = ROWS[:5]  # judge (longer wins): tuned, tuned, tuned, base, tie
    with open(runs / "quick" / "eval" / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    store = Store(runs / "ratings.sqlite")  # where `sftlab ui runs` keeps them
    gold = [Pair("gold q", "good", "bad", gold="a")]
    assert sync_studies(store, runs, [], gold) == []
    study = store.studies()[0]["id"]
    _rate(store, study, "ann", {"q1": "a long tuned answer", "q2": "meh", "q3": "and a third longer one",
                                "q4": "the base is longer", "gold q": "bad"})  # q5: tie  # fmt: skip
    _rate(store, study, "bob", {"q1": "a long tuned answer"})  # q2-q5: ties
    # A --compare study with the answers the other way round (a = base), and one nobody judged.
    swapped = store.add_study("swapped", "x.jsonl", "base", "tuned",
                              [Pair("q4", "the base is longer", "tiny"), Pair("other", "x", "y")])  # fmt: skip
    _rate(store, swapped, "cy", {"q4": "tiny"})
    assert J.ratings_stores(runs / "quick") == [(runs / "ratings.sqlite").resolve()]
    rec = J.judge_eval(runs / "quick" / "eval", "http://judge.test/v1", transport=StubJudge().transport(),
                       say=lambda *a: None)  # fmt: skip
    judge = {"q1": "tuned", "q2": "tuned", "q3": "tuned", "q4": "base", "q5": "tie"}
    human = [("q1", "tuned"), ("q2", "base"), ("q3", "tuned"), ("q4", "base"), ("q5", "tie"),
             ("q1", "tuned"), ("q2", "tie"), ("q3", "tie"), ("q4", "tie"), ("q5", "tie"), ("q4", "tuned")]  # fmt: skip
    pairs = [(judge[q], h) for q, h in human]
    assert rec["agreement"] == {"kappa": pytest.approx(J.cohen_kappa(pairs)), "n": 11, "items": 5,
                                "observed": pytest.approx(6 / 11)}  # fmt: skip
    assert "Cohen's kappa" in J.format_judge(rec)
    assert (runs / "quick" / "eval" / "judge_cache.jsonl").is_file()


def test_no_ratings_no_agreement(tmp_path):
    assert run(ROWS[:2], StubJudge(), ratings=[tmp_path / "none.sqlite"])["agreement"] is None
    assert J.ratings_stores(tmp_path) == []


def test_samples_without_base_answers_get_grades_only():
    rows = [{k: v for k, v in r.items() if k != "base_answer"} for r in ROWS[:3]]
    stub = StubJudge()
    rec = run(rows, stub)
    assert rec["pairwise"] is None and rec["agreement"] is None and len(stub.chats) == 3
    assert "base" not in rec["single"] and rec["single"]["model"] is not None
    assert "judge pairwise" not in J.format_judge(rec)


def test_default_model_bare_host_and_refused_key():
    stub = StubJudge(prefix="/v1")
    rec = J.judge_samples(ROWS[:1], "http://judge.test", transport=stub.transport(), say=lambda *a: None)
    assert rec["judge"]["endpoint"] == "http://judge.test/v1" and rec["judge"]["model"] == "stub-judge"
    assert J.probe("http://judge.test", transport=stub.transport()) == ("http://judge.test/v1", "stub-judge")
    assert J.probe("http://judge.test/v1", "other", transport=stub.transport()) == ("http://judge.test/v1", "other")
    refuse = httpx.MockTransport(lambda request: httpx.Response(401, json={"error": "bad key"}))
    with pytest.raises(ConfigError, match="refused the API key"):
        J.judge_samples(ROWS[:1], "http://judge.test/v1", transport=refuse, say=lambda *a: None)


def test_the_api_key_is_sent_from_the_environment(monkeypatch):
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return StubJudge()(request)

    monkeypatch.setenv("SFTLAB_JUDGE_API_KEY", "sk-judge")
    J.judge_samples(ROWS[:1], "http://judge.test/v1", transport=httpx.MockTransport(handler), say=lambda *a: None)
    assert set(seen) == {"Bearer sk-judge"}


def test_an_unreachable_endpoint_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ConfigError, match=re.escape(f"judge endpoint {url} is unreachable")) as err:
        J.judge_samples(ROWS[:1], url, say=lambda *a: None)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unreachable"):
        J.probe(url)


@pytest.fixture(scope="module")
def served(lively_model_dir):
    from helpers import live_server

    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    engine = Engine(load_served(str(lively_model_dir)), max_batch=8)
    url, stop = live_server(create_app(engine, Limits(max_tokens=64), None, grace_s=2))
    yield {"url": url, "model": engine.served.ids[0]}
    stop()


def test_a_live_sftlab_serve_as_the_judge(served, tmp_path):
    """A random tiny model answers garbage: the run completes, grades are missing or in 1..10."""
    rows = ROWS[:3]
    rec = J.judge_samples(rows, served["url"] + "/v1", cache=tmp_path / "c.jsonl", max_tokens=16, workers=2,
                          say=lambda *a: None)  # fmt: skip
    j = rec["judge"]
    assert j["model"] == served["model"] and j["failed"] == 0 and j["requests"] >= 12
    assert all(g is None or 1 <= g <= 10 for it in rec["items"] for g in it["grade"].values())
    p = rec["pairwise"]
    assert p["n"] + p["missing"] == 3 and p["wins"] + p["losses"] + p["ties"] == p["n"]
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == j["requests"]
    J.format_judge(rec)


def test_sftlab_eval_compare_judge_writes_the_judgment_into_metrics_json(tiny_model_dir, tmp_path, capsys):
    """The whole command: eval --compare --judge against a stub judge served over HTTP; only the open-ended
    rows (data.eval) are judged, the multiple-choice task's are not."""
    from conftest import FIXTURES, tiny_config, write_jsonl
    from fastapi import FastAPI
    from helpers import live_server

    from sftlab.cli import main
    from sftlab.loop.train import train

    stub, app = StubJudge(), FastAPI()
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "stub-judge"}]})

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        stub.chats.append(body)
        return {"choices": [{"message": {"role": "assistant", "content": stub.reply(body["messages"])}}]}

    url, stop = live_server(app)
    try:
        train(tiny_config(tiny_model_dir, tmp_path / "run", f"data.eval=[{FIXTURES / 'train_small.jsonl'}]",
                          "train.method=lora"), say=lambda *a, **k: None)  # fmt: skip
        mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q?", "choices": ["yes", "no"], "answer": 0}])
        args = ["eval", str(tmp_path / "run"), "--compare", "--judge", url, "eval.max_examples=3",
                "eval.max_new_tokens=6", "eval.semantic=false", "eval.bertscore=false", "eval.meteor=false",
                f"eval.tasks=[{{path: {mc}, type: multiple_choice}}]"]  # fmt: skip
        assert main(args) == 0
        first = len(stub.chats)
        assert main(args) == 0  # the same answers again: every judgment comes from the cache
    finally:
        stop()
    record = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    judged = record["judge"]
    assert judged["judge"]["model"] == "stub-judge" and judged["judge"]["requests"] == 0  # the second run's
    assert {it["source"] for it in judged["items"]} == {"data.eval"} and len(judged["items"]) == 3
    assert judged["pairwise"]["n"] + judged["pairwise"]["missing"] == 3 and 0 < first <= 4 * 3  # 2 grades, 2 orders
    assert "judge pairwise" in capsys.readouterr().out
