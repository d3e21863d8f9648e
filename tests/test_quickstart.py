"""The README's main job on the embedded SmolLM2-135M-Instruct (slow: a few minutes on 2 cores)."""

import pytest
from conftest import ROOT

from sftlab.generate import Sampling, answer, answer_prompts, gather_conversations
from sftlab.rundir import load_run


@pytest.mark.slow
def test_quickstart_trains_and_the_tuned_model_answers(quickstart_run, tmp_path):
    run, summary = quickstart_run
    assert summary["outcome"] == "completed"
    assert summary["final_eval_loss"] < 0.8 * summary["first_eval_loss"]
    tuned = load_run(str(run))
    assert answer(tuned, [{"role": "user", "content": "Convert 7 kilometers to meters."}]) == "7 kilometers is 7,000 meters."
    # The demo's prompts: the tuned model is right on at least 4 of 6, and on more than the base.
    prompts = str(ROOT / "examples" / "prompts.jsonl")
    conversations, expected = gather_conversations([], prompts, None)
    models = {"response": tuned, "base_response": load_run(tuned.base_name)}
    rows = answer_prompts(models, conversations, Sampling(64), say=lambda *a: None, expected=expected)
    right = {k: sum(r[f"{k}_right"] for r in rows) for k in models}
    assert len(rows) == 6 and right["response"] >= 4 and right["response"] > right["base_response"], right
    # After the quickstart, eval --compare and report show whether the tune helped (fewer prompts here).
    from sftlab.evaluate.report import write_report
    from sftlab.evaluate.runner import run_eval

    record = run_eval(str(run), ["eval.max_examples=16", "eval.max_new_tokens=48"], compare="base",
                      say=lambda *a, **k: None)  # fmt: skip
    tuned, base = record["models"]["model"]["metrics"], record["models"]["base"]["metrics"]
    assert tuned["eval/loss"] < base["eval/loss"] and tuned["eval/rougeL"] > base["eval/rougeL"]
    assert {"mmlu_mini/accuracy", "gsm_mini/exact_match", "humaneval_mini/pass@1"} <= set(tuned)
    html = write_report(str(run)).read_text()
    assert "humaneval_mini/pass@1" in html and "data:image/png;base64" in html
    # ... and `sftlab ui` lists the run as finished and offers its base vs tuned answers for blind rating.
    from fastapi.testclient import TestClient

    from sftlab.ui.app import Settings, create_app

    ui = TestClient(create_app(Settings(run.parent, tmp_path / "ratings.sqlite")), base_url="http://127.0.0.1")
    assert [(r["name"], r["status"]) for r in ui.get("/api/runs").json()] == [("qs", "finished")]
    (study,) = ui.get("/api/studies").json()["studies"]
    assert study["name"] == "qs" and study["items"] >= 16 and study["model_b"] == "base (smollm2-135m-instruct)"
