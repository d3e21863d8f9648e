"""Two CPU processes (torchrun, gloo) through accelerate: the same losses as one process, and resumable."""

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, ROOT, tiny_config
from helpers import losses as _losses
from helpers import torchrun as _torchrun

from sftlab.loop.train import train


def _yaml(tiny_model_dir, out, tmp_path, **train_keys) -> Path:
    cfg = {"model": {"name": str(tiny_model_dir)},
           "data": {"train": [str(FIXTURES / "train_small.jsonl")], "eval": [str(FIXTURES / "train_small.jsonl")],
                    "template": "chatml", "max_length": 128},
           "train": {"method": "lora", "output_dir": str(out), "precision": "fp32", "report_to": [], "lr": 1e-3,
                     "batch_size": 2, "grad_accum": 2, "max_steps": 4, **train_keys},
           "lora": {"dropout": 0.0}}  # fmt: skip
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tiny_model_dir, tmp_path):
    # One process, the same global batch: 4 x 2 x 1 = 2 x 2 x 2 examples a step.
    train(tiny_config(tiny_model_dir, tmp_path / "one", f"data.eval=[{FIXTURES / 'train_small.jsonl'}]",
                      "train.batch_size=4", "train.grad_accum=2", "train.max_steps=4", "data.template=chatml"),
          say=lambda *a, **k: None)  # fmt: skip
    two = tmp_path / "two"
    _torchrun(_yaml(tiny_model_dir, two, tmp_path, save_steps=2, save_total_limit=0))
    assert _losses(two) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert _losses(two, "eval_loss") == pytest.approx(_losses(tmp_path / "one", "eval_loss"), rel=1e-5)

    # Resume the 2-process run from its step-2 checkpoint: steps 3 and 4 repeat exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for leftover in resumed.glob("checkpoints/*4"):
        shutil.rmtree(leftover)
    _torchrun(_yaml(tiny_model_dir, resumed, tmp_path, save_steps=2, save_total_limit=0), "--resume")
    assert _losses(resumed) == pytest.approx(_losses(two), rel=1e-6)


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    for path in configs:
        assert load_config_from_file(str(path)).num_processes >= 1


def test_sharding_engines_refuse_what_they_cannot_checkpoint_and_deepspeed_learns_the_micro_batch(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from sftlab.loop.train import TrainError, _configure_engine

    def fake(kind):
        plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto"})
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    for override in ("train.save_steps=10", "train.grad_accum=2"):
        with pytest.raises(TrainError, match=f"{override.split('=')[0]}.*under deepspeed.*fsdp or DDP"):
            _configure_engine(fake(DistributedType.DEEPSPEED), tiny_config("m", tmp_path, override))
    with pytest.raises(TrainError, match="both shard the model"):
        _configure_engine(fake(DistributedType.DEEPSPEED), tiny_config("m", tmp_path, "train.sharding=fsdp"))
    ds = fake(DistributedType.DEEPSPEED)
    _configure_engine(ds, tiny_config("m", tmp_path, "train.batch_size=6"))
    assert ds.state.deepspeed_plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 6,
                                                          "gradient_accumulation_steps": 1}  # fmt: skip
    _configure_engine(fake(DistributedType.MULTI_GPU), tiny_config("m", tmp_path, "train.save_steps=10"))  # DDP: all fine
    with pytest.raises(TrainError, match="DeepSpeed config was not applied.*GPUs only.*train.sharding=fsdp"):
        _configure_engine(fake(DistributedType.MULTI_CPU), tiny_config("m", tmp_path), {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_a_gathered_state_saves_tied_weights_once_as_the_live_model_does(tiny_model_dir, tmp_path, monkeypatch):
    """FSDP/DeepSpeed gather tied weights as separate copies; the saved model must not gain lm_head.weight."""
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import sftlab.loop.train as train_mod

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert lm.config.tie_word_embeddings
    gathered = {f"lm.{k}": v.clone() for k, v in lm.state_dict().items()}  # as get_state_dict returns them
    accelerator = SimpleNamespace(get_state_dict=lambda model: gathered, is_main_process=True)
    monkeypatch.setattr(train_mod, "sharding_engine", lambda acc: "deepspeed")
    run = SimpleNamespace(accelerator=accelerator, model=None, lm=lm, out=tmp_path / "sharded", template_source=None,
                          speed=SimpleNamespace(sharded=0),  # accelerate's DeepSpeed, not train.sharding
                          cfg=tiny_config(tiny_model_dir, tmp_path / "x", "train.method=full"),
                          tokenizer=SimpleNamespace(save_pretrained=lambda out: None),
                          task=SimpleNamespace(save_extras=lambda out, tok, model: None))  # fmt: skip
    train_mod.save_model(run, train_mod._gathered_state(run))
    lm.save_pretrained(tmp_path / "plain")
    assert load_file(run.out / "model.safetensors").keys() == load_file(tmp_path / "plain" / "model.safetensors").keys()
