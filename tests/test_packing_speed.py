"""Packing (docs/correctness.md rule 4), attention kernels, chunked loss, precision preparation."""

import pytest
import torch
from conftest import tiny_config
from helpers import losses, training_model
from safetensors.torch import load_file

from sftlab.data.batching import collate, collate_packed
from sftlab.loop.train import train
from sftlab.model.loss import chunked_cross_entropy, loss_sum
from sftlab.speed import attention

ROWS = [{"input_ids": [1, 5, 9, 13, 2, 7, 8], "labels": [-100, -100, 9, 13, 2, -100, 8]},
        {"input_ids": [1, 4, 2], "labels": [-100, 4, 2]},
        {"input_ids": [3, 3, 3, 3], "labels": [3, 3, 3, 3]},
        {"input_ids": [6, 1, 5], "labels": [-100, 1, 5]}]


def tiny(tiny_model_dir, fused):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    if fused:
        assert attention.use_for_training(model)
    return model


def test_packed_layout():
    b = collate_packed(ROWS, max_length=8, pad_id=0)
    assert b["input_ids"].shape[1] <= 8  # best-fit-decreasing bins never exceed max_length
    segments = b["cu_seq_lens_q"].diff().tolist()
    assert sum(segments) == b["input_ids"].numel()
    real = sorted(segments)
    for n in (7, 4, 3, 3):
        real.remove(n)  # every example is one segment; what remains are the bins' padded tails
    assert sum(real) == b["input_ids"].numel() - 17
    for row_pos, row_labels in zip(b["position_ids"].tolist(), b["labels"].tolist()):
        for i, p in enumerate(row_pos):
            if p == 0:
                assert row_labels[i] == -100  # no example learns to predict the next one's first token
    assert (b["labels"][:, 1:] != -100).sum() == (collate(ROWS, 0)["labels"][:, 1:] != -100).sum()


def test_padding_free_layout_is_one_row_of_the_real_tokens():
    b = collate_packed(ROWS, max_length=None, pad_id=0)
    assert b["input_ids"].shape == (1, 17)  # padded: 4 rows x 7
    assert b["cu_seq_lens_q"].diff().tolist() == [7, 4, 3, 3]
    assert (b["labels"][:, 1:] != -100).sum() == (collate(ROWS, 0)["labels"][:, 1:] != -100).sum()


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


@pytest.mark.parametrize("fused", [True, False], ids=["per-example-sdpa", "block-diagonal-mask"])
def test_packed_loss_equals_padded_loss_and_examples_are_isolated(tiny_model_dir, fused):
    model = tiny(tiny_model_dir, fused)
    with torch.no_grad():
        padded = loss_sum(model, collate(ROWS, 0)).item()
        packed_batch = collate_packed(ROWS, max_length=8, pad_id=0)
        packed = loss_sum(model, packed_batch).item()
        # Control: the same packed row without segment boundaries lets examples see each other.
        leaky = {k: packed_batch[k] for k in ("input_ids", "labels")}
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
        leak = loss_sum(model, leaky).item()
    assert packed == pytest.approx(padded, rel=1e-12)
    assert abs(leak - padded) / padded > 1e-5  # 10^7 times the tolerance above


def test_fused_causal_attention_equals_the_models_masked_attention_on_padded_batches(tiny_model_dir):
    with torch.no_grad():
        ours = loss_sum(tiny(tiny_model_dir, True), collate(ROWS, 0)).item()
        theirs = loss_sum(tiny(tiny_model_dir, False), collate(ROWS, 0)).item()
    assert ours == pytest.approx(theirs, rel=1e-12)


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


def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    results = []
    for chunk in (1000, 7):
        hidden.grad, head.weight.grad = None, None
        loss = chunked_cross_entropy(hidden, head, targets, chunk)
        loss.backward()
        results.append((loss.item(), hidden.grad.clone(), head.weight.grad.clone()))
    (l1, h1, w1), (l2, h2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(w1, w2, atol=1e-6)


def test_lora_in_bf16_keeps_frozen_weights_in_bf16_and_trainable_in_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    from sftlab.model.load import for_training

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm = for_training(lm, load_config(None, ["lora.modules_to_save=[lm_head]"]), "bf16", 10)
    dtypes = {(p.requires_grad, p.dtype) for p in lm.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


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


def test_compiled_blocks_give_the_same_run(tiny_model_dir, tmp_path):
    from sftlab.errors import ModelError
    from sftlab.speed import compile_blocks

    runs = []
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        train(tiny_config(tiny_model_dir, tmp_path / name, "train.method=full", "train.max_steps=3", *extra),
              say=lambda *a: None)  # fmt: skip
        runs.append(losses(tmp_path / name))
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
    with pytest.raises(ModelError, match="train.compile: no transformer block"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
