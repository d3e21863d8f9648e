"""benchmarks/compare_trl.py divides each run's model FLOP/s by the matmul peak of its own precision."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_trl.py"


@pytest.fixture(scope="module")
def compare_trl():
    spec = importlib.util.spec_from_file_location("compare_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A CPU without native bf16: emulated bf16 runs at a fifth of fp32's speed.
PEAKS = {"fp32": 300.0, "bf16": 60.0}
PER_TOKEN = 1e9  # model FLOPs per token


@pytest.mark.parametrize("precision, peak", [("fp32", 300.0), ("bf16", 60.0)])
def test_mfu_is_against_the_peak_of_the_runs_precision(compare_trl, precision, peak):
    run = {"precision": precision, "tokens_per_s": 30.0, "steady_tokens_per_s": 45.0}
    got = compare_trl.mfu(run, PER_TOKEN, PEAKS)
    assert got["peak_precision"] == precision and got["peak_gflops"] == peak
    assert got["mfu"] == pytest.approx(30.0 * PER_TOKEN / (peak * 1e9))
    assert got["steady_mfu"] == pytest.approx(45.0 * PER_TOKEN / (peak * 1e9))


def test_fp32_run_on_emulated_bf16_stays_below_100_percent(compare_trl):
    run = {"precision": "fp32", "tokens_per_s": 160.0, "steady_tokens_per_s": 160.0}
    assert compare_trl.mfu(run, PER_TOKEN, PEAKS)["mfu"] < 1.0  # 2.67 against the bf16 peak
