"""Every train.method on the tiny model: trains, changes only its own parameters, reloads, merges or says why not."""

import pytest
import torch
from conftest import FIXTURES, tiny_config, write_jsonl
from helpers import losses

from sftlab.config import MERGEABLE
from sftlab.export.merge import NF4_ATOL, ExportError, merge
from sftlab.generate import answer
from sftlab.loop.train import train
from sftlab.rundir import load_run, read_metrics

METHODS = ["lora", "qlora", "adalora", "ia3", "prefix", "ptuning", "prompt", "adapter", "freeze", "full"]
QUIET = dict(say=lambda *a, **k: None)


@pytest.fixture(scope="module")
def same_example(tmp_path_factory):
    """One conversation eight times: every step sees the same batch, so the loss must fall."""
    path = tmp_path_factory.mktemp("same") / "same.jsonl"
    row = {"messages": [{"role": "user", "content": "river stone"}, {"role": "assistant", "content": "garden music cloud"}]}
    return write_jsonl(path, [row] * 8)


def _base_state(model_dir):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_reloads_and_merges_or_refuses(method, tiny_model_dir, same_example, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", f"train.method={method}", "train.max_steps=6",
                      "train.lr=1e-2", "peft.freeze_layers=1", data=same_example)  # fmt: skip
    summary = train(cfg, **QUIET)
    run = losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(run))) and run[-1] < run[0]
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    if method != "full":
        assert summary["trainable_params"] < summary["total_params"]

    loaded = load_run(str(tmp_path / "run"))
    assert isinstance(answer(loaded, [{"role": "user", "content": "river stone"}], max_new_tokens=4), str)
    base = _base_state(tiny_model_dir)
    if method in ("full", "freeze"):
        tuned = loaded.model.state_dict()
        changed = {k for k in base if not torch.equal(base[k], tuned[k])}
        if method == "freeze":  # only the last layer (peft.freeze_layers=1) moved
            assert changed and all(k.startswith("model.layers.1.") for k in changed)
    elif method == "qlora":  # the base is the 4-bit NF4 model it trained on, not the original weights
        from sftlab.model.load import is_4bit

        assert is_4bit(loaded.model)
    else:  # the base weights inside the reloaded model are the original ones
        inner = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        state = inner.state_dict()
        for key, value in base.items():
            match = [k for k in state if k.replace(".base_layer", "").replace(".inner", "") == key]
            assert match and torch.equal(state[match[0]], value), key

    if method in MERGEABLE:
        assert merge(str(tmp_path / "run"), str(tmp_path / "merged")) < (NF4_ATOL if method == "qlora" else 1e-3)
    elif method in ("full", "freeze"):
        with pytest.raises(ExportError, match="full model already"):
            merge(str(tmp_path / "run"), str(tmp_path / "merged"))
    else:
        with pytest.raises(ExportError, match="cannot be merged"):
            merge(str(tmp_path / "run"), str(tmp_path / "merged"))


def test_lora_variants_configure_peft(tiny_model_dir, tmp_path):
    from sftlab.config import load_config
    from sftlab.model.methods import peft_config

    cfg = load_config(None, ["lora.use_dora=true", "lora.use_rslora=true", "lora.init=pissa"])
    pc = peft_config(cfg, 10)
    assert pc.use_dora and pc.use_rslora and pc.init_lora_weights == "pissa"
    for init in ("gaussian", "olora"):
        run = tmp_path / init
        train(tiny_config(tiny_model_dir, run, f"lora.init={init}", "lora.use_dora=true", "train.max_steps=2"), **QUIET)
        assert (run / "adapter_model.safetensors").is_file()


def test_adalora_schedule_uses_the_real_step_count(tiny_model_dir):
    from sftlab.config import load_config
    from sftlab.errors import ModelError
    from sftlab.model.methods import peft_config

    pc = peft_config(load_config(None, ["train.method=adalora"]), 200)
    assert (pc.total_step, pc.tinit, pc.tfinal) == (200, 20, 40)
    with pytest.raises(ModelError, match="leave no steps"):
        peft_config(load_config(None, ["train.method=adalora", "peft.adalora_tinit=0.6", "peft.adalora_tfinal=0.5"]), 10)


def test_neftune_noises_training_only(tiny_model_dir, tmp_path):
    """Same weights: eval loss is identical with and without NEFTune; training losses differ."""
    runs = {}
    for name, alpha in (("plain", 0), ("neft", 5)):
        cfg = tiny_config(tiny_model_dir, tmp_path / name, f"train.neftune_alpha={alpha}", "train.lr=1e-12",
                          f"data.eval=[{FIXTURES / 'train_small.jsonl'}]", "train.max_steps=2")  # fmt: skip
        train(cfg, **QUIET)
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    evals = {k: [m["eval_loss"] for m in v if "eval_loss" in m] for k, v in runs.items()}
    assert evals["plain"][0] == evals["neft"][0]  # step 0: the same weights, noise off in eval
    train_losses = {k: [m["loss"] for m in v if "loss" in m] for k, v in runs.items()}
    assert train_losses["plain"][0] != train_losses["neft"][0]


def test_prompt_methods_refuse_packing():
    from sftlab.config import load_config
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="packing"):
        load_config(None, ["train.method=prefix", "data.packing=true"])


def _lora_pair(tiny_model_dir, *overrides):
    """The tiny model with LoRA in float64 twice: sftlab's fused update, and peft's own forward."""
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    from sftlab.model.load import for_training
    from sftlab.speed import lora_fused

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
        lm = for_training(lm, load_config(None, list(overrides)), "fp32", 10)
        lora_fused.use_for_training(lm)
        with torch.no_grad():  # peft starts B at zero, which would hide the update and A's gradient
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        models.append(lm)
    peft_own = [m for m in models[1].modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    for m in peft_own:
        del m.forward  # back to peft's class forward
    return models[0], models[1], len(peft_own)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_update_equals_peft_forward_and_gradients(tiny_model_dir, dropout):
    fused, peft_own, count = _lora_pair(tiny_model_dir, f"lora.dropout={dropout}")
    assert count == 2 * 7  # every linear layer of the two blocks
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 8, 4]])
    results = []
    for lm in (fused, peft_own):
        lm.train()
        torch.manual_seed(1)  # the same dropout masks
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), [p.grad for p in lm.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-12)
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-14) for x, y in zip(ga, gb))
    assert all(float(g.abs().sum()) > 0 for g in ga)  # A and B both learn: the check is not vacuous


def test_fused_lora_keeps_peft_forward_for_disabled_adapters_and_dora(tiny_model_dir):
    fused, peft_own, _ = _lora_pair(tiny_model_dir, "lora.dropout=0.0")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        on = fused(input_ids=ids).logits
        with fused.disable_adapter():
            off = fused(input_ids=ids).logits
        with peft_own.disable_adapter():
            assert torch.equal(off, peft_own(input_ids=ids).logits)
    assert not torch.allclose(on, off)
    dora, dora_own, _ = _lora_pair(tiny_model_dir, "lora.dropout=0.0", "lora.use_dora=true")
    with torch.no_grad():
        assert torch.allclose(dora(input_ids=ids).logits, dora_own(input_ids=ids).logits, rtol=1e-12)


def test_training_and_eval_switch_the_same_forwards_and_leave_an_instance_forward(tiny_model_dir):
    # One function switches the lean RMSNorm and the fused LoRA update for training and for `sftlab eval`
    # (speed.as_trained.computing), which switches back after; a module whose forward an accelerate hook
    # replaced on the instance keeps that forward throughout.
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    from sftlab.model.load import for_training
    from sftlab.speed import training_forwards
    from sftlab.speed.as_trained import FP32, computing

    def fresh():
        lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lm = for_training(lm, load_config(None, ["train.method=lora"]), "fp32", 10)
        norms = [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm")]
        loras = [m for m in lm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        hooked = [norms[0], loras[0]]
        for m in hooked:
            m.forward = hook = type(m).forward.__get__(m)
            m._hook = hook
        return lm, norms, loras, hooked

    lm, norms, loras, hooked = fresh()
    assert training_forwards(lm, decoder=False) == (0, len(loras) - 1)  # an encoder keeps its own norms
    lm, norms, loras, hooked = fresh()
    assert training_forwards(lm) == (len(norms) - 1, len(loras) - 1)
    assert all(vars(m)["forward"] is m._hook for m in hooked)
    lm, norms, loras, hooked = fresh()
    with computing(lm, FP32):
        switched = [m for m in norms + loras if "forward" in vars(m) and m not in hooked]
        assert len(switched) == len(norms) + len(loras) - 2
    assert [m for m in norms + loras if "forward" in vars(m)] == hooked
    assert all(vars(m)["forward"] is m._hook for m in hooked)
