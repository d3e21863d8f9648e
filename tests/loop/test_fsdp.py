"""train.sharding=fsdp: PyTorch's FSDP2 over two CPU processes (torchrun, gloo) trains as one process does
at the same global batch, each rank holding about half the parameters, and saves one whole model."""

import json

import pytest
import torch
import yaml
from conftest import FIXTURES, tiny_config
from helpers import losses, torchrun
from safetensors.torch import load_file

from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.loop.train import train


def _yaml(model_dir, out, tmp_path, method: str):
    cfg = {"model": {"name": str(model_dir)},
           "data": {"train": [str(FIXTURES / "train_small.jsonl")], "eval": [str(FIXTURES / "train_small.jsonl")],
                    "template": "chatml", "max_length": 128},
           "train": {"method": method, "output_dir": str(out), "precision": "fp32", "report_to": [], "lr": 1e-3,
                     "batch_size": 2, "grad_accum": 2, "max_steps": 3, "sharding": "fsdp"},
           "lora": {"dropout": 0.0}}  # fmt: skip
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_process(model_dir, out, method: str):
    train(tiny_config(model_dir, out, f"data.eval=[{FIXTURES / 'train_small.jsonl'}]", f"train.method={method}",
                      "train.batch_size=4", "train.grad_accum=2", "train.max_steps=3"),
          say=lambda *a, **k: None)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method, weights", [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")])
def test_two_sharded_ranks_train_as_one_process_and_save_one_model(tiny_model_dir, tmp_path, method, weights):
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(tiny_model_dir, one, method)
    out = torchrun(_yaml(tiny_model_dir, two, tmp_path, method))
    assert "FSDP2 over 2 blocks" in out
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)  # 2 ranks x 2 x 2 = 1 x 4 x 2 examples a step
    assert losses(two, "eval_loss") == pytest.approx(losses(one, "eval_loss"), rel=1e-5)
    assert losses(two, "grad_norm") == pytest.approx(losses(one, "grad_norm"), rel=1e-4)
    sharding = json.loads((two / "summary.json").read_text())["sharding"]
    assert sharding["ranks"] == 2 and 0.4 < sharding["rank0_elements"] / sharding["elements"] < 0.6
    mine, theirs = load_file(two / weights), load_file(one / weights)
    assert mine.keys() == theirs.keys()
    for key in theirs:  # the whole model, gathered once: the one-process run's weights. Adam divides each
        # element's step by its own gradient scale, so a near-zero gradient summed in another order may move its
        # weight differently; a tenth of one step (lr 1e-3) bounds that, where a wrong gradient moves every weight.
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-4)
    if method == "full":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(two)  # plain transformers loads it


def test_what_fsdp_does_not_cover_yet_is_refused_by_name():
    base = ["model.name=x", "train.sharding=fsdp"]
    load_config(None, base + ["train.method=lora"])
    for extra, message in ((["train.save_best=true", "data.eval_split=0.1"], "save_best"),
                           (["train.method=qlora"], "full or lora"),
                           (["train.compile=true"], "compile"), (["task=classification"], "causal_lm")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(None, base + extra)


def test_every_rank_runs_as_many_eval_forwards_and_the_extra_ones_count_nothing():
    """A sharded forward is collective: a rank with one batch fewer repeats one (discarded), or the
    others would wait for it forever."""
    import contextlib

    import datasets

    from sftlab.metrics.perplexity import eval_loss

    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]] * 7, "labels": [[-100, 2, 3]] * 7,
                                       "length": [3] * 7})  # fmt: skip

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.calls = torch.nn.Parameter(torch.ones(())), 0

        def forward(self, input_ids, labels, **_):
            self.calls += 1
            return (labels != -100).sum().double() * self.w.double()  # loss sum 1 a supervised token

    shares = []
    for rank in range(3):  # 7 batches of 1 over 3 ranks: 3, 2, 2 real ones
        module = Counting()
        acc = type("Acc", (), {"process_index": rank, "num_processes": 3, "device": "cpu",
                               "autocast": staticmethod(contextlib.nullcontext), "reduce": staticmethod(lambda t, op: t)})  # fmt: skip
        record = eval_loss(module, data, 1, 0, acc)
        shares.append((module.calls, record["eval_tokens"]))
    assert [calls for calls, _ in shares] == [3, 3, 3]
    assert [tokens for _, tokens in shares] == [6, 4, 4]  # 2 supervised tokens each, the repeats uncounted


@pytest.mark.slow
def test_sigterm_to_the_launcher_then_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Each rank writes its own shards (Distributed Checkpoint) when the ranks agree to stop; --resume
    on the same ranks continues with the uninterrupted run's losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def config(out):
        path = _yaml(tiny_model_dir, out, tmp_path, "lora")
        cfg = yaml.safe_load(path.read_text())
        cfg["data"].pop("eval")
        cfg["train"] |= {"max_steps": 30, "save_steps": 0}
        path.write_text(yaml.safe_dump(cfg))
        return path

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    torchrun(config(whole))
    launcher = [str(__import__("pathlib").Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "-m", "sftlab", "train", str(config(cut))]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(FIXTURES.parents[1] / "src")}
    proc = subprocess.Popen(launcher, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ((cut / "metrics.jsonl").is_file() and len((cut / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    saved = sorted((cut / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / ".metadata").is_file() and len(list(saved[0].glob("rng-*.pt"))) == 2
    stopped = int(saved[0].name.split("-")[1])
    assert 3 <= stopped < 30 and len(losses(cut)) == stopped
    torchrun(config(cut), "--resume")
    assert losses(cut) == pytest.approx(losses(whole), rel=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process_and_exports(tiny_model_dir, tmp_path):
    """Distributed Checkpoint reshards: the 2-rank run's step-2 shards, loaded by one unsharded process
    at batch 4 x accumulation 2 (= 2 x 2 x 2 ranks), give its steps 3 and 4; its step-4 shards export."""
    import shutil

    two, one = tmp_path / "two", tmp_path / "one"
    path = _yaml(tiny_model_dir, two, tmp_path, "lora")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].pop("eval")
    cfg["train"] |= {"max_steps": 4, "save_steps": 2, "save_total_limit": 0}
    path.write_text(yaml.safe_dump(cfg))
    torchrun(path)
    shutil.copytree(two, one)
    shutil.rmtree(one / "checkpoints" / "step-0000004")
    overrides = [f"train.output_dir={one}", "train.sharding=none", "train.batch_size=4"]
    with pytest.raises(Exception, match="their product is 8"):  # 2 x 2 x 2 ranks = 8 a step, all on one rank here
        train(load_config(path, [*overrides, "train.batch_size=2"]), resume=True, say=lambda *a, **k: None)
    train(load_config(path, overrides), resume=True, say=lambda *a, **k: None)
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)

    # The last checkpoint, written as one model (resharded into one process), is the model the run saved at
    # its end; `sftlab export` takes the checkpoint itself and merges it for vLLM.
    from transformers import AutoModelForCausalLM

    from sftlab.cli import main
    from sftlab.loop.materialize import materialize

    ckpt = two / "checkpoints" / "step-0000004"
    out = materialize(ckpt, tmp_path / "from-checkpoint")
    mine, theirs = load_file(out / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert main(["export", str(ckpt), "--format", "hf", "--quant", "f32", "--output", str(tmp_path / "hf")]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


@pytest.mark.slow
def test_bf16_shards_train_as_a_bf16_process_over_fp32_masters(tiny_model_dir, tmp_path):
    """Under bf16 the fp32 shards are cast for compute by FSDP's policy, as one process computes on a bf16
    copy over fp32 masters (speed.masters): the same losses up to bf16's summation order."""
    path = _yaml(tiny_model_dir, tmp_path / "two", tmp_path, "full")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].pop("eval")
    cfg["train"]["precision"] = "bf16"
    path.write_text(yaml.safe_dump(cfg))
    torchrun(path)
    one = load_config(path, [f"train.output_dir={tmp_path / 'one'}", "train.sharding=none", "train.batch_size=4"])
    train(one, say=lambda *a, **k: None)
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["compute"]["masters"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_a_whole_checkpoint_exports_as_the_model_its_run_ends_with(tiny_model_dir, tmp_path):
    from sftlab.loop.materialize import is_checkpoint, materialize

    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, run, "train.method=lora", "train.max_steps=2", "train.save_steps=2"),
          say=lambda *a, **k: None)  # fmt: skip
    ckpt = run / "checkpoints" / "step-0000002"
    assert is_checkpoint(ckpt) and not is_checkpoint(run)
    out = materialize(ckpt, tmp_path / "model")
    mine, theirs = load_file(out / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    (ckpt / "trainable.safetensors").write_bytes(b"damaged")
    with pytest.raises(Exception, match="trainable.safetensors"):
        materialize(ckpt, tmp_path / "again")


def test_a_resume_on_other_ranks_keeps_the_global_batch_even_with_the_config_unchanged(tmp_path, monkeypatch):
    from sftlab.loop.train import TrainError, _reshaped_for_ranks

    (tmp_path / "state.json").write_text(json.dumps({"step": 2, "ranks": 2}))
    saved = {"train.batch_size": 2, "train.grad_accum": 2, "train.sharding": "fsdp"}
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(TrainError, match="trained 8 examples a step.*their product is 2"):
        _reshaped_for_ranks(tmp_path, saved, dict(saved), [])  # 2 x 2 x 4 = 16, not the 8 it trained
    monkeypatch.setenv("WORLD_SIZE", "1")
    now = {"train.batch_size": 4, "train.grad_accum": 2, "train.sharding": "none"}
    assert _reshaped_for_ranks(tmp_path, saved, now, ["train.batch_size", "train.sharding", "lora.r"]) == ["lora.r"]
