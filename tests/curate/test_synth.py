"""`sftlab data synth` (Self-Instruct): parsing, filters, determinism and resume with a deterministic fake
generator; the endpoint client against a stub server; the embedded model in one slow test."""

import http.server
import json
import random
import re
import threading
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.curate.synth import (
    Completion,
    SimilarityIndex,
    SynthSettings,
    Task,
    load_seed_tasks,
    parse_completion,
    reject_reason,
    render_prompt,
    run_synth,
)
from sftlab.errors import SftlabError

SEEDS = Path(__file__).parents[2] / "examples" / "synth" / "seed_tasks.jsonl"
VOCAB = ("river mountain teacher engine violin harvest lantern orbit pepper canyon rumor ledger meadow "
         "comet anchor saddle tunnel quartz ballot glacier parrot sermon timber walnut harbor cipher "
         "falcon mosaic vessel thistle ember marble pocket ribbon summit velvet willow zenith bamboo "
         "cobalt dynamo fossil garnet hammock igloo jigsaw kettle lagoon magnet nectar oyster").split()  # fmt: skip


def fake_text(prompt: str, seed: int, i: int) -> str:
    """Five blocks: a fresh task, a copy of an in-context task, a banned word, a too-short one, garbage."""
    rng = random.Random(f"{seed}:{i}")
    words = rng.sample(VOCAB, 6)
    copied = re.search(r"Instruction: (.*)", prompt).group(1)
    return (f" Describe how {' '.join(words)} relate.\nInput: <noinput>\nOutput: They {words[0]} together.\n\n"
            f"Task 9\nInstruction: {copied}\nInput: <noinput>\nOutput: the same\n\n"
            f"Task 10\n**Instruction:** Draw a picture of a {words[1]}.\n**Input:**\n**Output:** ok\n\n"
            f"Task 11\nInstruction: Hi there\nOutput: x\n\n"
            f"Task 12\nsomething without fields")  # fmt: skip


class FakeGenerator:
    name = "fake"

    def __init__(self, interrupt_at: int | None = None, garbage: bool = False):
        self.calls, self.interrupt_at, self.garbage = 0, interrupt_at, garbage

    def complete(self, prompts, seed, s):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.garbage:
            return [Completion("nothing useful", True) for _ in prompts]
        return [Completion(fake_text(p, seed, i), stopped=i % 2 == 0) for i, p in enumerate(prompts)]


def _settings(**kw):
    return SynthSettings(**{"num": 12, "batch": 3, "seed": 5, **kw})


def _lines(path):
    return Path(path).read_text().splitlines()


def test_parse_reads_numbered_and_bold_tasks_and_reports_the_rest():
    items = parse_completion(Completion(fake_text(render_prompt([Task("Name a colour.", "", "red")]), 1, 0), True))
    assert [c.reason for c in items] == [None, None, None, None, "unparseable"]
    assert items[0].task.input == "" and items[0].task.output.startswith("They ")
    assert items[1].task.instruction == "Name a colour."
    assert items[2].task == Task(items[2].task.instruction, "", "ok") and items[2].task.instruction.startswith("Draw")
    cut = parse_completion(Completion(" Say hi.\nInput: <noinput>\nOutput: hi\n\nTask 5\nInstruction: Count", False))
    assert [c.reason for c in cut] == [None, "cut off at max_new_tokens"]


def test_every_filter_has_its_reason():
    s, index = _settings(), SimilarityIndex()
    index.add("Name the capital city of the given country.")
    from sftlab.curate.synth import _banned_pattern

    banned = _banned_pattern(s.banned)

    def reason(instruction, output="fine"):
        return reject_reason(Task(instruction, "", output), s, index, banned)

    assert reason("Name the capital of the given country.") == "ROUGE-L >= 0.7 to the pool"
    assert reason("Hi there") == "instruction under 3 words"
    assert reason(" ".join(["word"] * 151)) == "instruction over 150 words"
    assert reason("Draw a cat for me.") == "banned keyword"
    assert reason("- List three fruits.") == "instruction starts with punctuation"
    assert reason("List three fruits please.", output="") == "empty output"
    assert reason("List three fruits that are yellow.") is None


def test_similarity_equals_rouge_score_rougeL():
    from rouge_score import rouge_scorer

    from sftlab.metrics.text import MixedTokenizer

    pool = [json.loads(line)["instruction"] for line in _lines(SEEDS)]
    index = SimilarityIndex()
    for text in pool:
        index.add(text)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=MixedTokenizer())
    for query in ("Name the capital of the country.", "Write a poem about the sea.", "Sort these words."):
        expected = max(scorer.score(p, query)["rougeL"].fmeasure for p in pool)
        assert 0 < expected < 1
        assert index.reaches(query, expected - 1e-9) and not index.reaches(query, expected + 1e-9)


def test_synth_reaches_num_with_filtered_distinct_tasks_and_counts_every_rejection(tmp_path):
    out = tmp_path / "synth.jsonl"
    assert run_synth(str(SEEDS), str(out), _settings(), FakeGenerator(), say=lambda *_: None) == 0
    records = [json.loads(line) for line in _lines(out)]
    assert len(records) == 12 and all(set(r) == {"instruction", "input", "output"} for r in records)
    index = SimilarityIndex()
    for r in load_seed_tasks(str(SEEDS)):
        index.add(r.instruction)
    for r in records:  # nothing kept is close to the seeds or to an earlier kept task
        assert not index.reaches(r["instruction"], 0.7)
        index.add(r["instruction"])
    progress = json.loads(out.with_suffix(".progress.json").read_text())
    rejected = [json.loads(line) for line in _lines(out.with_suffix(".rejected.jsonl"))]
    from collections import Counter

    assert dict(Counter(r["reason"] for r in rejected)) == progress["reasons"]
    for reason in ("ROUGE-L >= 0.7 to the pool", "banned keyword", "instruction under 3 words", "unparseable",
                   "cut off at max_new_tokens"):  # fmt: skip
        assert progress["reasons"][reason] > 0
    assert main(["data", "synth", "--seed-tasks", str(SEEDS), "--num", "1", "--output", str(out),
                 "--endpoint", "http://127.0.0.1:9"]) == 2  # fmt: skip


def test_same_seed_same_output_other_seed_other_output(tmp_path):
    def run(name, seed):
        run_synth(str(SEEDS), str(tmp_path / name), _settings(seed=seed), FakeGenerator(), say=lambda *_: None)
        return (tmp_path / name).read_text()

    assert run("a.jsonl", 5) == run("b.jsonl", 5)
    assert run("c.jsonl", 6) != run("a.jsonl", 5)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    run_synth(str(SEEDS), str(whole), _settings(), FakeGenerator(), say=lambda *_: None)
    with pytest.raises(KeyboardInterrupt):
        run_synth(str(SEEDS), str(parts), _settings(), FakeGenerator(interrupt_at=3), say=lambda *_: None)
    with open(parts, "a") as f:  # killed after appending a round but before its progress was saved
        f.write(json.dumps({"instruction": "half", "input": "", "output": "written"}) + "\n")
    messages = []
    assert run_synth(str(SEEDS), str(parts), _settings(), FakeGenerator(), say=messages.append) == 0
    assert messages[0].startswith(f"resuming {parts}: ")
    assert parts.read_text() == whole.read_text()
    assert parts.with_suffix(".rejected.jsonl").read_text() == whole.with_suffix(".rejected.jsonl").read_text()
    # a larger --num goes on from there
    run_synth(str(SEEDS), str(parts), _settings(num=15), FakeGenerator(), say=lambda *_: None)
    assert _lines(parts)[:12] == _lines(whole) and len(_lines(parts)) == 15


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    out = tmp_path / "s.jsonl"
    run_synth(str(SEEDS), str(out), _settings(num=3), FakeGenerator(), say=lambda *_: None)
    with pytest.raises(SftlabError, match=r"other settings \(seed: was 5, now 6\)"):
        run_synth(str(SEEDS), str(out), _settings(num=3, seed=6), FakeGenerator(), say=lambda *_: None)
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    with pytest.raises(SftlabError, match="not a synth run's output"):
        run_synth(str(SEEDS), str(foreign), _settings(num=3), FakeGenerator(), say=lambda *_: None)


def test_a_generator_that_produces_nothing_stops_after_patience(tmp_path):
    messages = []
    rc = run_synth(str(SEEDS), str(tmp_path / "s.jsonl"), _settings(patience=3), FakeGenerator(garbage=True),
                   say=messages.append)  # fmt: skip
    assert rc == 1 and "3 rounds in a row produced no new task (0 of 12)" in messages[-1]


def test_bad_seed_files_name_the_line(tmp_path, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "No output"}\n')
    assert main(["data", "synth", "--seed-tasks", str(bad), "--num", "1", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: a seed task needs" in capsys.readouterr().err
    selfinstruct = tmp_path / "si.jsonl"
    selfinstruct.write_text(json.dumps({"instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}]}))
    assert load_seed_tasks(str(selfinstruct)) == [Task("Add.", "1+1", "2")]


class _Stub(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):
        self._reply({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.headers.get("Authorization"), body))
        text = fake_text(body["prompt"], body["seed"], 0)
        self._reply({"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})

    def _reply(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_endpoint_generator_sends_openai_completion_requests(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "e.jsonl"
        rc = main(["data", "synth", "--seed-tasks", str(SEEDS), "--num", "4", "--output", str(out), "--batch", "2",
                   "--endpoint", f"http://127.0.0.1:{server.server_port}", "--api-key", "k1", "--max-new-tokens",
                   "64", "--seed", "3"])  # fmt: skip
    finally:
        server.shutdown()
    assert rc == 0 and len(_lines(out)) == 4
    auth, body = _Stub.requests[0]
    assert auth == "Bearer k1" and body["model"] == "stub-model" and body["max_tokens"] == 64
    assert body["prompt"].endswith("Task 4\nInstruction:") and body["temperature"] == 0.7
    assert json.loads(out.with_suffix(".progress.json").read_text())["settings"]["generator"] == "endpoint model stub-model"


@pytest.mark.slow
def test_the_embedded_model_grows_the_shipped_seed_tasks(tmp_path):
    out = tmp_path / "synth.jsonl"
    rc = main(["data", "synth", "--seed-tasks", str(SEEDS), "--num", "2", "--batch", "4", "--max-new-tokens", "160",
               "--output", str(out), "--patience", "6"])  # fmt: skip
    assert rc == 0
    records = [json.loads(line) for line in _lines(out)]
    assert len(records) == 2 and all(r["instruction"] and r["output"] for r in records)
