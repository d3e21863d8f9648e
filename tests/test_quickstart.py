"""The README's main job on the embedded SmolLM2-135M-Instruct (slow: a few minutes on 2 cores)."""

import pytest
from conftest import ROOT

from sftlab.config import load_config
from sftlab.generate import answer, load_for_inference
from sftlab.train import train


@pytest.mark.slow
def test_quickstart_trains_and_the_tuned_model_answers(tmp_path):
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [f"train.output_dir={tmp_path / 'qs'}"])
    summary = train(cfg, say=lambda *a, **k: None)
    assert summary["outcome"] == "completed"
    assert summary["final_eval_loss"] < 0.8 * summary["first_eval_loss"]
    tuned = load_for_inference(str(tmp_path / "qs"))
    assert answer(tuned, [{"role": "user", "content": "Convert 7 kilometers to meters."}]) == "7 kilometers is 7,000 meters."
