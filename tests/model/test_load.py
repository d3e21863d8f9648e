"""Finding and loading the base: model.name forms, the GGUF cache, hub errors, and the model as a method trains it."""

import pytest
import torch

from sftlab.config import ModelConfig
from sftlab.data.templates import end_of_turn_ids
from sftlab.errors import ModelError
from sftlab.model.load import load_tokenizer, resolve_model_dir


def test_embedded_alias_is_converted_once_with_its_chat_template(smol_tok):
    path = resolve_model_dir("smollm2-135m-instruct")
    assert path.endswith("smollm2-135m-instruct")
    assert "<|im_start|>" in smol_tok.chat_template
    assert smol_tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(smol_tok)


def test_local_directory_loads(smol_tok):
    tok = load_tokenizer(ModelConfig(name=resolve_model_dir("smollm2-135m-instruct")))
    assert tok.eos_token == "<|im_end|>"


def test_hub_id_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"could not load model 'someone/some-model'.*hub"):
        load_tokenizer(ModelConfig(name="someone/some-model"))


def test_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model_dir("./nowhere/model")
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_dir(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))


def test_a_gguf_file_is_converted_into_a_cache_dir_named_by_its_content(tmp_path, monkeypatch):
    import sftlab.model.load as models

    gguf = tmp_path / "My-Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []
    monkeypatch.setattr(models, "_ensure_converted", lambda src, out: calls.append((src, out)) or out)
    first = models.resolve_model_dir(str(gguf))
    gguf.write_bytes(b"GGUF other")
    second = models.resolve_model_dir(str(gguf))
    assert [c[0] for c in calls] == [gguf, gguf]
    assert calls[0][1].parent == models.cache_root() / "models" and calls[0][1].name.startswith("My-Model.Q8_0-")
    assert first == str(calls[0][1]) and second != first  # new content, new conversion


def test_parameters_are_counted_at_their_real_size_when_zero3_partitions_them():
    import torch

    from sftlab.model.load import count_parameters

    model = torch.nn.Linear(4, 3)
    assert count_parameters(model) == (15, 15)
    for p in model.parameters():  # what deepspeed.zero.Init leaves on a rank: an empty tensor and its size
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == (12, 15)


def test_lora_in_bf16_keeps_frozen_weights_in_bf16_and_trainable_in_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sftlab.config import load_config
    from sftlab.model.load import for_training

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm = for_training(lm, load_config(None, ["lora.modules_to_save=[lm_head]"]), "bf16", 10)
    dtypes = {(p.requires_grad, p.dtype) for p in lm.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


def test_a_frozen_base_goes_to_bf16_as_from_pretrained_loads_it():
    """Parameters to bf16; RoPE's inv_freq buffer and what the model's dtype plan keeps in fp32 stay fp32 (a bf16
    inv_freq computes positions unlike every runtime that loads the saved model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.model.load import _to_half

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))  # fmt: skip
    lm._keep_in_fp32_modules_strict = ["mlp.gate_proj"]
    _to_half(lm, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in lm.named_parameters()}
    assert dtypes.pop("model.layers.0.mlp.gate_proj.weight") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    assert {b.dtype for b in lm.buffers()} == {torch.float32}


def test_the_forwards_sftlab_speed_sets_survive_an_eval_and_train_switch(tiny_model_dir):
    # transformers >= 5.25 loads with Hub kernels by default and swaps forwards again at every train()/eval()
    # switch; a model sftlab loads (to train, or a run to evaluate) keeps the forwards sftlab.speed chose.
    from sftlab.model.load import load_model
    from sftlab.speed import training_forwards

    lm = load_model(ModelConfig(name=str(tiny_model_dir)))
    assert training_forwards(lm) == (5, 0)  # two norms per layer and the final one
    lm.eval()
    lm.train()
    norms = [m for m in lm.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5 and all("forward" in vars(m) for m in norms)
    assert not getattr(lm, "use_kernels", False)


def test_every_path_sftlab_loads_weights_by_keeps_its_own_kernels(tiny_model_dir):
    # A run directory, a merged export and the GGUF conversion are read by load_weights, not from_pretrained.
    from transformers import AutoModelForCausalLM

    from sftlab.model.load import load_weights

    lm = load_weights(AutoModelForCausalLM, tiny_model_dir)
    assert lm.use_kernels is False
