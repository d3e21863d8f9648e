"""What sftlab.speed chooses and applies: the batch layout, gradient checkpointing, compiled blocks; each gives the same run."""

import pytest
import torch
from conftest import tiny_config
from helpers import losses, training_model
from safetensors.torch import load_file

from sftlab.data.batching import collate
from sftlab.loop.train import train
from sftlab.model.loss import loss_sum
from sftlab.speed import attention


def test_batch_layout_is_flat_by_default_only_where_the_varlen_kernel_runs(monkeypatch):
    from sftlab.config import load_config
    from sftlab.speed import batch_layout

    default = load_config(None, [])
    assert batch_layout(default, True, "cpu", "bf16") == "padded"
    monkeypatch.setattr(attention, "varlen_runs", lambda device, dtype: dtype == torch.bfloat16)
    assert batch_layout(default, True, "cuda", "bf16") == "flat"
    assert batch_layout(default, True, "cuda", "fp32") == "padded"  # the varlen kernel is half precision only
    assert batch_layout(default, False, "cuda", "bf16") == "padded"  # the model's own attention
    assert batch_layout(load_config(None, ["data.padding_free=false"]), True, "cuda", "bf16") == "padded"
    assert batch_layout(load_config(None, ["data.padding_free=true"]), True, "cpu", "fp32") == "flat"
    assert batch_layout(load_config(None, ["data.packing=true"]), True, "cuda", "bf16") == "packed"


def test_padding_free_refuses_what_would_join_or_ignore_it():
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    for bad, match in ((["data.padding_free=true", "data.packing=true"], "choose one"),
                       (["data.padding_free=true", "train.method=prefix"], "virtual tokens"),
                       (["data.padding_free=true", "task=classification"], "causal_lm"),
                       (["data.padding_free=maybe"], "padding_free")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)


def test_packed_training_equals_unpacked_training(tiny_model_dir, tmp_path):
    runs = {}
    for name, extra in {"padded": [], "packed": ["data.packing=true"], "flat": ["data.padding_free=true"],
                        "packed-model-attention": ["data.packing=true", "train.attention=model"]}.items():
        out = tmp_path / name
        train(tiny_config(tiny_model_dir, out, "train.method=full", *extra), say=lambda *a: None)
        runs[name] = (losses(out), load_file(out / "model.safetensors"))
    for name in ("packed", "flat", "packed-model-attention"):
        assert runs[name][0] == pytest.approx(runs["padded"][0], rel=1e-5)
        a, b = runs[name][1], runs["padded"][1]
        diff = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        assert diff / sum(float(w.norm() ** 2) for w in a.values()) ** 0.5 < 1e-5


def test_gradient_checkpointing_gives_the_same_run(tiny_model_dir, tmp_path):
    runs = []
    for name, extra in (("plain", []), ("ckpt", ["train.gradient_checkpointing=true"])):
        train(tiny_config(tiny_model_dir, tmp_path / name, *extra), say=lambda *a: None)
        runs.append(losses(tmp_path / name))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_gradient_checkpointing_keeps_fewer_activations(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    rows = [{"input_ids": [1, 5, 9, 13, 2] * 100, "labels": [-100] * 499 + [2]}] * 8
    saved = {}
    for on in (False, True):
        cfg = load_config(None, [f"train.gradient_checkpointing={str(on).lower()}"])
        lm = training_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg, "fp32")
        lm.train()
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_sum(lm, collate(rows, 0))
        saved[on] = total[0]
    assert saved[True] < 0.5 * saved[False]


def test_compiled_blocks_give_the_same_run_plain_and_under_fsdp(tiny_model_dir, tmp_path, monkeypatch):
    """train.compile alone and with train.sharding=fsdp (one process: a 1-rank group, sftlab/speed/sharding.py):
    the eager run's losses; under FSDP2 the blocks are compiled before they become sharded units, and the
    compiled graphs run."""
    import torch._dynamo.utils as dynamo_utils
    from torch.distributed.fsdp import FSDPModule

    import sftlab.speed as speed
    from sftlab.errors import ModelError
    from sftlab.speed import compile_blocks

    def compile_unsharded(lm):
        assert not any(isinstance(m, FSDPModule) for m in lm.modules())
        return compile_blocks(lm)

    monkeypatch.setattr(speed, "compile_blocks", compile_unsharded)
    runs, printed, graphs = {}, [], {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"]),
                        ("sharded", ["train.compile=true", "train.sharding=fsdp"])):  # fmt: skip
        dynamo_utils.counters.clear()
        train(tiny_config(tiny_model_dir, tmp_path / name, "train.method=full", "train.max_steps=3", *extra),
              say=lambda *a, **k: printed.append(" ".join(map(str, a))))  # fmt: skip
        runs[name], graphs[name] = losses(tmp_path / name), dynamo_utils.counters["stats"]["unique_graphs"]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-5)
    assert runs["sharded"] == pytest.approx(runs["eager"], rel=1e-5)
    assert graphs["eager"] == 0 and graphs["compiled"] > 0 and graphs["sharded"] > 0
    assert any("FSDP2 over 2 blocks; 2 blocks compiled" in line for line in printed)
    with pytest.raises(ModelError, match="train.compile: no transformer block"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
