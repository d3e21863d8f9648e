"""train.sharding=fsdp: PyTorch's FSDP2 over two CPU processes (torchrun, gloo) trains as one process does
at the same global batch, each rank holding about half the parameters, and saves one whole model; the same
run launched as two machines, or by accelerate (an FSDP config adopted as train.sharding=fsdp), is the same."""

import json

import pytest
import torch
import yaml
from conftest import FIXTURES, tiny_config
from helpers import free_port, interrupt_during_step, launch_together, launcher, launcher_env, losses, torchrun
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


def _same_run_in_one_process(path, out) -> None:
    """The run of the 2-rank YAML at `path` trained by one unsharded process at the same global batch."""
    train(load_config(path, [f"train.output_dir={out}", "train.sharding=none", "train.batch_size=4"]),
          say=lambda *a, **k: None)  # fmt: skip


def _one_process(model_dir, out, method: str, *extra: str):
    train(tiny_config(model_dir, out, f"data.eval=[{FIXTURES / 'train_small.jsonl'}]", f"train.method={method}",
                      "train.batch_size=4", "train.grad_accum=2", "train.max_steps=3", *extra),
          say=lambda *a, **k: None)  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_lora(tiny_model_dir, tmp_path_factory):
    """The LoRA run on 2 ranks of one machine (torchrun): (its config, its directory, its stdout), the run
    every other launch of the same config must reproduce."""
    tmp = tmp_path_factory.mktemp("fsdp-lora")
    path = _yaml(tiny_model_dir, tmp / "two", tmp, "lora")
    return path, tmp / "two", torchrun(path)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, weights", [
    ("full", [], "model.safetensors"), ("lora", [], "adapter_model.safetensors"),
    ("lora", ["lora.use_dora=true", "lora.modules_to_save=[lm_head]"], "adapter_model.safetensors")],
    ids=["full", "lora", "dora-with-head"])  # fmt: skip
def test_two_sharded_ranks_train_as_one_process_and_save_one_model(tiny_model_dir, tmp_path, method, extra, weights,
                                                                   request):  # fmt: skip
    """Full fine-tuning, LoRA, and DoRA with a fully trained (untied) head copy."""
    one = tmp_path / "one"
    _one_process(tiny_model_dir, one, method, *extra)
    if method == "lora" and not extra:
        _, two, out = request.getfixturevalue("two_rank_lora")
    else:
        two = tmp_path / "two"
        out = torchrun(_yaml(tiny_model_dir, two, tmp_path, method), *extra)
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
    load_config(None, base + ["train.save_best=true", "data.eval_split=0.1", "train.gradient_checkpointing=true"])
    load_config(None, base + ["train.compile=true"])  # tests/speed/test_speed.py runs it
    for extra, message in ((["train.method=qlora"], "full or lora"), (["task=classification"], "causal_lm")):
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
    import signal
    import subprocess
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
    command = launcher("torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "sftlab",
                       "train", str(config(cut)))  # fmt: skip
    proc = subprocess.Popen(command, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    _same_run_in_one_process(path, tmp_path / "one")
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


def _same_run(out, reference) -> None:
    for key in ("loss", "eval_loss", "grad_norm"):
        assert losses(out, key) == pytest.approx(losses(reference, key), rel=1e-5)


@pytest.mark.slow
def test_two_machines_of_one_process_each_train_as_two_processes_on_one(two_rank_lora, tmp_path):
    """The README's multi-node torchrun command, both nodes on this machine (127.0.0.1): the run of two ranks
    on one machine."""
    path, reference, _ = two_rank_lora
    port = str(free_port())
    nodes = [launcher("torchrun", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr",
                      "127.0.0.1", "--master_port", port, "-m", "sftlab", "train", str(path),
                      f"train.output_dir={tmp_path / 'nodes'}")
             for rank in (0, 1)]  # fmt: skip
    first, second = launch_together(*nodes)
    assert "3 steps of 2x2x2" in first and "FSDP2 over 2 blocks" in first and not second.strip()
    _same_run(tmp_path / "nodes", reference)
    assert json.loads((tmp_path / "nodes" / "summary.json").read_text())["sharding"]["ranks"] == 2


@pytest.mark.slow
def test_accelerate_launch_on_two_machines_trains_as_torchrun_does(two_rank_lora, tmp_path):
    """The README's multi-machine accelerate command with the shipped DDP config, both machines here: the
    losses of the sharded 2-rank run (DDP and FSDP2 both train as one process at that global batch)."""
    from conftest import ROOT

    path, reference, _ = two_rank_lora
    port = str(free_port())
    machines = [launcher("accelerate", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
                         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "sftlab", "train",
                         str(path), f"train.output_dir={tmp_path / 'ddp'}", "train.sharding=none")
                for rank in (0, 1)]  # fmt: skip
    first, _ = launch_together(*machines)
    assert "3 steps of 2x2x2" in first and "FSDP2" not in first
    _same_run(tmp_path / "ddp", reference)


@pytest.mark.slow
def test_accelerate_fsdp_config_trains_on_sftlabs_fsdp_with_its_settings(two_rank_lora, tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml` (on CPU accelerate itself would train
    unsharded): the run is train.sharding=fsdp with the config's reshard, unit and checkpointing settings, and
    trains as the torchrun run does, resumable checkpoints included."""
    from conftest import ROOT

    path, reference, _ = two_rank_lora
    out = tmp_path / "accel"
    command = launcher("accelerate", "--config_file", str(ROOT / "examples" / "accelerate" / "fsdp.yaml"),
                       "--num_processes", "2", "--main_process_port", str(free_port()),
                       "--fsdp_reshard_after_forward", "false", "--fsdp_activation_checkpointing", "true",
                       "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                       "-m", "sftlab", "train", str(path), f"train.output_dir={out}", "train.sharding=none",
                       "train.save_steps=3")  # fmt: skip
    (printed,) = launch_together(command)
    assert ("training on sftlab's FSDP2 with train.sharding=fsdp, train.fsdp_reshard_after_forward=False, "
            "train.fsdp_blocks=['LlamaDecoderLayer'], train.gradient_checkpointing=True") in printed
    assert "FSDP2 over 2 blocks" in printed
    _same_run(out, reference)
    saved = load_config(out / "config.yaml")
    assert (saved.train.sharding, saved.train.fsdp_reshard_after_forward, saved.train.gradient_checkpointing) == \
        ("fsdp", False, True)  # fmt: skip
    assert len(list((out / "checkpoints" / "step-0000003").glob("rng-*.pt"))) == 2  # sharded, resumable


def test_an_accelerate_fsdp_config_maps_to_train_settings_or_is_refused_by_key():
    from sftlab.speed.sharding import from_accelerate

    v2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
          "FSDP_OFFLOAD_PARAMS": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
          "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "None",
          "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}  # fmt: skip
    assert from_accelerate({}) is None and from_accelerate({**v2, "ACCELERATE_USE_FSDP": "false"}) is None
    assert from_accelerate(v2) == {"sharding": "fsdp"}  # accelerate's defaults leave the run YAML's settings be
    mapped = from_accelerate({**v2, "FSDP_RESHARD_AFTER_FORWARD": "False", "FSDP_ACTIVATION_CHECKPOINTING": "True",
                              "FSDP_TRANSFORMER_CLS_TO_WRAP": "Qwen3DecoderLayer, Qwen3MoeDecoderLayer"})  # fmt: skip
    assert mapped == {"sharding": "fsdp", "fsdp_reshard_after_forward": False, "gradient_checkpointing": True,
                      "fsdp_blocks": ["Qwen3DecoderLayer", "Qwen3MoeDecoderLayer"]}  # fmt: skip
    for change, key in (({"FSDP_VERSION": "1"}, "fsdp_version 1"), ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
                        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy SIZE_BASED_WRAP"),
                        ({"FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}, "fsdp_auto_wrap_policy NO_WRAP"),
                        ({"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, "fsdp_reshard_after_forward SHARD_GRAD_OP"),
                        ({"FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"}, "checkpointing_offload"),
                        ({"FSDP_IGNORED_MODULES": "vision"}, "fsdp_ignored_modules")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"fsdp_config asks for .*{key}.*torchrun"):
            from_accelerate({**v2, **change})
    parallel = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "2",
                "PARALLELISM_CONFIG_TP_SIZE": "1", "PARALLELISM_CONFIG_CP_SIZE": "4"}  # fmt: skip
    with pytest.raises(ConfigError, match=r"parallelism_config sets dp_replicate_size \(HSDP\), cp_size"):
        from_accelerate({**v2, **parallel})
    assert from_accelerate({**v2, **parallel, "PARALLELISM_CONFIG_DP_REPLICATE_SIZE": "1",
                            "PARALLELISM_CONFIG_CP_SIZE": "1"}) == {"sharding": "fsdp"}  # fmt: skip


def test_an_adopted_fsdp_config_is_validated_and_kept_from_accelerate(tmp_path):
    from sftlab.loop.train import TrainError, adopt_accelerate_fsdp

    def env(**more):
        return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2", **more}

    said, launched = [], env()
    cfg = adopt_accelerate_fsdp(tiny_config("m", tmp_path, "train.method=lora"), launched, said.append)
    assert cfg.train.sharding == "fsdp" and "ACCELERATE_USE_FSDP" not in launched and len(said) == 1
    yaml_set = tiny_config("m", tmp_path, "train.fsdp_blocks=[LlamaMLP]", "train.fsdp_reshard_after_forward=false")
    kept = adopt_accelerate_fsdp(yaml_set, env(FSDP_RESHARD_AFTER_FORWARD="true"), said.append).train
    assert (kept.fsdp_blocks, kept.fsdp_reshard_after_forward) == (["LlamaMLP"], False)
    with pytest.raises(TrainError, match="fsdp_config trains on sftlab's FSDP2.*full or lora.*ddp.yaml"):
        adopt_accelerate_fsdp(tiny_config("m", tmp_path, "train.method=qlora"), env(), said.append)
    unsharded = tiny_config("m", tmp_path)
    assert adopt_accelerate_fsdp(unsharded, {}, said.append) is unsharded


def test_shard_hands_fully_shard_the_units_innermost_first_with_the_reshard_setting(tiny_model_dir, monkeypatch):
    """What sftlab.speed.sharding.shard asks of FSDP2 (recorded in place of fully_shard, one process)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict as dcp_state
    import torch.distributed.fsdp as fsdp
    from transformers import AutoModelForCausalLM

    from sftlab.speed.sharding import shard

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((type(module).__name__, kw)))
    monkeypatch.setattr(dcp_state, "set_model_state_dict", lambda *a, **k: None)
    for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda: 2), ("get_rank", lambda: 0),
                        ("broadcast", lambda *a, **k: None)):  # fmt: skip
        monkeypatch.setattr(dist, name, value)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shard(lm, lm, "fp32", "cpu", False, ["LlamaDecoderLayer", "LlamaMLP"]) == 4
    assert [name for name, _ in calls] == ["LlamaMLP", "LlamaDecoderLayer"] * 2 + ["LlamaForCausalLM"]
    assert all(kw["reshard_after_forward"] is False for _, kw in calls)


def test_named_fsdp_units_must_exist_in_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftlab.errors import ModelError
    from sftlab.speed.sharding import transformer_blocks

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(transformer_blocks(lm)) == len(transformer_blocks(lm, ["LlamaDecoderLayer"])) == 2
    assert len(transformer_blocks(lm, ["LlamaAttention"])) == 2
    with pytest.raises(ModelError, match=r"\['Qwen3DecoderLayer'\] not in LlamaForCausalLM; its blocks are \['LlamaDecoderLayer'\]"):
        transformer_blocks(lm, ["Qwen3DecoderLayer"])


@pytest.mark.slow
def test_the_best_weights_are_gathered_from_the_shards_and_saved_as_the_final_model(tiny_model_dir, tmp_path):
    """train.save_best under FSDP2: every rank joins the gather of the trained weights at each better eval,
    rank 0 writes best/, and the final model is best/'s, not the last step's. lr 1 makes the eval loss
    rise after step 1, so the best is not the end."""
    path = _yaml(tiny_model_dir, tmp_path / "two", tmp_path, "full")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"] |= {"lr": 1.0, "save_best": True, "eval_steps": 1}
    path.write_text(yaml.safe_dump(cfg))
    out = torchrun(path)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["final_eval_loss"] > summary["best_eval_loss"], out[-500:]
    best = load_file(tmp_path / "two" / "best" / "trainable.safetensors")
    final = load_file(tmp_path / "two" / "model.safetensors")
    assert set(best) == set(final)  # the tied head once, as a one-process run saves it
    assert all(torch.equal(best[k], final[k]) for k in best)
    _same_run_in_one_process(path, tmp_path / "one")
    theirs = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert theirs["best_step"] == 1 and summary["best_eval_loss"] == pytest.approx(theirs["best_eval_loss"], rel=1e-4)
    assert set(load_file(tmp_path / "one" / "best" / "trainable.safetensors")) == set(best)


@pytest.mark.slow
def test_a_sharded_model_generates_on_every_rank_the_answers_of_one_process(lively_model_dir, tmp_path):
    """eval.generate_every under FSDP2: every rank runs generate() in step (the root unit's weights gathered
    around it), rank 0 writes generations.jsonl; the greedy answers are one process's."""
    path = _yaml(lively_model_dir, tmp_path / "two", tmp_path, "lora")
    cfg = yaml.safe_load(path.read_text())
    cfg["eval"] = {"generate_every": 2, "generate_examples": 3, "max_new_tokens": 12}
    path.write_text(yaml.safe_dump(cfg))
    torchrun(path)
    _same_run_in_one_process(path, tmp_path / "one")
    mine, theirs = ((tmp_path / run / "generations.jsonl").read_text().splitlines() for run in ("two", "one"))
    rows = [json.loads(line) for line in mine]
    assert [r["step"] for r in rows] == [2] * 3 + [3] * 3 and any(r["answer"] for r in rows)
    assert mine == theirs
    assert losses(tmp_path / "two", "gen_chrf") == losses(tmp_path / "one", "gen_chrf")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_process_shards_over_a_group_of_one_as_the_plain_run_and_resumes(tiny_model_dir, tmp_path, monkeypatch,
                                                                            method):  # fmt: skip
    """train.sharding=fsdp in a process no launcher started (python -m sftlab train, one GPU): sftlab makes a
    1-rank process group, so the sharded code path runs whole and gives the plain run's losses bit for bit;
    its sharded checkpoint resumes the run exactly, and the group is gone after."""
    import torch.distributed as dist

    def run(out, *extra):
        return tiny_config(tiny_model_dir, tmp_path / out, f"train.method={method}", "train.max_steps=4",
                           f"data.eval=[{FIXTURES / 'train_small.jsonl'}]", "train.eval_steps=2", *extra)  # fmt: skip

    train(run("plain"), say=lambda *a, **k: None)
    summary = train(run("sharded", "train.sharding=fsdp"), say=lambda *a, **k: None)
    assert summary["sharding"]["ranks"] == 1 and not dist.is_initialized()
    for key in ("loss", "eval_loss", "grad_norm"):
        assert losses(tmp_path / "sharded", key) == losses(tmp_path / "plain", key)
    interrupt_during_step(monkeypatch, 2)
    assert train(run("cut", "train.sharding=fsdp"), say=lambda *a, **k: None)["outcome"] == "interrupted"
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoints" / "step-0000002" / "rng-0.pt").is_file()  # sharded: one rank's RNG
    train(run("cut", "train.sharding=fsdp"), resume=True, say=lambda *a, **k: None)
    assert losses(tmp_path / "cut") == losses(tmp_path / "plain") and not dist.is_initialized()
