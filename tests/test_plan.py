"""`sftlab plan`: the memory estimate's parts, its proposals, and its accuracy against measured peaks."""

import sys

import pytest
from conftest import ROOT, tiny_config

from sftlab.cli import main
from sftlab.plan import estimate, parse_size, propose, shapes


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("512m") == 512 * 2**20 and parse_size("1.5 G") == 1.5 * 2**30
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_counts_match_the_real_wrapped_model(tiny_model_dir, tmp_path):
    from sftlab.model.load import count_parameters, for_training, load_base_for

    for method in ("lora", "full", "ia3", "adapter"):
        cfg = tiny_config(tiny_model_dir, tmp_path, f"train.method={method}")
        est = estimate(cfg)
        real = count_parameters(for_training(load_base_for(cfg, "fp32"), cfg, "fp32", 10))
        assert (est.trainable, est.total_params) == real
        assert est.optimizer == 8 * est.trainable and est.gradients == 4 * est.trainable


def test_checkpointing_and_batch_lower_the_estimate(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "train.batch_size=8", "train.grad_accum=2")
    mc = shapes(cfg)
    plain, ckpt, small = (estimate(cfg, 8, False, model_and_config=mc), estimate(cfg, 8, True, model_and_config=mc),
                          estimate(cfg, 2, False, model_and_config=mc))  # fmt: skip
    assert ckpt.activations < plain.activations and small.activations < plain.activations
    budget = (plain.total + small.total) // 2
    options = propose(cfg, budget, mc)
    assert options and all(o[3].total <= budget for o in options)
    assert all(b * a == 16 for b, a, _, _ in options)  # the effective batch is kept


def test_plan_cli(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {tiny_model_dir}}}\ntrain: {{method: full, batch_size: 8}}\ndata: {{max_length: 512}}\n")
    assert main(["plan", str(cfg), "--memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "proposed: train.batch_size=8" in out and "optimizer states" in out
    assert main(["plan", str(cfg), "--memory", "1MiB"]) == 1
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--memory", "lots"]) == 2


@pytest.mark.slow
def test_estimates_are_within_25_percent_of_measured_peaks():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plan_accuracy import CASES, compare

    for name, est, measured in compare(str(ROOT / "examples" / "quickstart.yaml"), CASES, "/tmp/sftlab-plan-test"):
        assert abs(est - measured) / measured < 0.25, (name, est, measured)
