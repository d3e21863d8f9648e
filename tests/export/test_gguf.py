"""`sftlab export --format gguf|ollama`: llama.cpp's converter on runs of the tiny model, read back and checked."""

import json

import pytest
import torch
from conftest import tiny_config

from sftlab.cli import main
from sftlab.export import gguf, llama_cpp
from sftlab.export.gguf_kv import read_metadata
from sftlab.export.merge import ExportError

PROBE = torch.tensor([[1, 9690, 198, 2683, 2, 198, 1, 520, 9531, 198]])


def _gguf_logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROBE).logits


def _tuned_logits(run):
    from sftlab.rundir import load_run

    with torch.no_grad():
        return load_run(str(run)).model.float()(PROBE).logits


def _reads_back_as_the_tuned_model(run, path, out: str, atol: float) -> None:
    from transformers import AutoTokenizer

    assert path.is_file() and "transformers GGUF loader: same greedy answer on 6/6" in out
    tuned = _tuned_logits(run)
    assert (_gguf_logits(path) - tuned).abs().max() <= atol * tuned.abs().max()
    meta = read_metadata(path)
    tok = AutoTokenizer.from_pretrained(run)
    assert meta["tokenizer.chat_template"] == tok.chat_template  # the training template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    report = json.loads((path.parent / f"{path.stem}.export.json").read_text())
    assert report["checks"][0]["agreement"] >= 0.99


def test_gguf_export_reads_back_as_the_tuned_model(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "gguf", "--quant", "f16", "--output", str(tmp_path)]) == 0
    _reads_back_as_the_tuned_model(lora_run, tmp_path / f"{lora_run.name}-f16.gguf", capsys.readouterr().out, 2e-3)


def test_an_unsupported_architecture_is_refused_naming_the_supported(tmp_path, smol_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=len(smol_tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "m")
    smol_tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.*GPT2"):
        gguf.export_gguf(str(tmp_path / "m"), str(tmp_path / "out"))


def test_an_export_that_answers_differently_is_deleted(lora_run, tmp_path, monkeypatch):
    real = gguf._set_eos

    def and_damage(staging, token, token_id):  # what a broken converter would write: other weights
        from safetensors.torch import load_file, save_file

        real(staging, token, token_id)
        weights = staging / "model.safetensors"
        tensors = {k: v + 0.5 * torch.randn_like(v) for k, v in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})

    monkeypatch.setattr(gguf, "_set_eos", and_damage)
    with pytest.raises(ExportError, match="does not answer like the tuned model.*export removed"):
        gguf.export_gguf(str(lora_run), str(tmp_path), "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_a_wrong_end_of_turn_is_caught_and_the_export_deleted(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf, "_reply_end", lambda tok: "<|endoftext|>")
    real = gguf._check_metadata
    monkeypatch.setattr(gguf, "_check_metadata", lambda path, tok, eos: real(path, tok, "<|im_end|>"))
    with pytest.raises(ExportError, match="not the end of turn"):
        gguf.export_gguf(str(lora_run), str(tmp_path), "f16")
    assert not list(tmp_path.glob("*.gguf"))


def test_ollama_export_writes_a_modelfile_beside_the_q8_0_gguf_which_reads_back(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "ollama", "--quant", "q8_0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    _reads_back_as_the_tuned_model(lora_run, tmp_path / f"{lora_run.name}-q8_0.gguf", out, 2e-2)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{lora_run.name}-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile  # chatml is a built-in
    assert f"ollama create {lora_run.name} -f {tmp_path / 'Modelfile'}" in out


def test_adapter_only_writes_the_base_and_a_lora_gguf_holding_the_run(lora_run, tmp_path):
    result = gguf.export_gguf(str(lora_run), str(tmp_path), "f16", adapter_only=True, ollama=True, say=print)
    assert result.adapter.is_file() and result.path.name == f"{lora_run.name}-base-f16.gguf"
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM ./{result.path.name}", f"ADAPTER ./{result.adapter.name}"]
    if llama_cpp.have_llama_cpp():
        assert result.checks[0].reader == "llama.cpp base + LoRA" and result.checks[0].same_answers == 6


def test_adapter_only_refuses_a_full_run(tiny_model_dir, tmp_path):
    from sftlab.loop.train import train

    train(tiny_config(tiny_model_dir, tmp_path / "full", "train.method=full", "train.max_steps=1"), say=lambda *a, **k: None)
    with pytest.raises(ExportError, match="holds a full model"):
        gguf.export_gguf(str(tmp_path / "full"), str(tmp_path / "out"), adapter_only=True)


def test_an_unknown_quant_type_is_refused_with_the_choices(lora_run, tmp_path):
    with pytest.raises(ExportError, match="--quant q3: not a GGUF type; choose one of f32, f16, bf16, q8_0, q4_0"):
        gguf.export_gguf(str(lora_run), str(tmp_path), "q3")


@pytest.mark.skipif(not llama_cpp.have_llama_cpp(), reason="k-quants need llama-cpp-python (make llama-cpp)")
def test_k_quant_export_through_llama_cpps_quantizer(lora_run, tmp_path):
    result = gguf.export_gguf(str(lora_run), str(tmp_path), "q4_k_m", say=print)
    readers = {c.reader: c for c in result.checks}
    assert set(readers) == {"transformers GGUF loader", "llama.cpp"}
    assert all(c.agreement >= 0.9 for c in result.checks)


@pytest.mark.slow
def test_embedded_model_q8_0_export_answers_like_sftlab_generate(quickstart_run, tmp_path):
    """The quickstart's LoRA run of the embedded model -> q8_0 GGUF -> llama.cpp (where installed, else transformers'
    GGUF reader) gives `sftlab generate`'s greedy answers on the bundled prompts (all but one of six)."""
    from pathlib import Path

    from sftlab.data.templates import stop_ids
    from sftlab.export.check import LlamaCppLM, TorchLM
    from sftlab.generate import Sampling, generate_answers, prompt_ids, read_prompts
    from sftlab.rundir import load_run

    root = Path(__file__).parents[2]
    run, _ = quickstart_run  # the quickstart's whole epoch: a 12-step run leaves near-ties llama.cpp's 8-bit flips
    convs, _ = read_prompts(str(root / "examples" / "prompts.jsonl"))
    result = gguf.export_gguf(str(run), str(tmp_path / "gguf"), "q8_0", prompts=convs, say=print)
    loaded = load_run(str(run))
    generated = generate_answers(loaded.model, loaded.tokenizer, convs, Sampling(max_new_tokens=48))
    stop = stop_ids(loaded.tokenizer, loaded.tokenizer.chat_template)
    if llama_cpp.have_llama_cpp():
        reader = LlamaCppLM(result.path, stop)
    else:
        from transformers import AutoModelForCausalLM

        reader = TorchLM(AutoModelForCausalLM.from_pretrained(result.path.parent, gguf_file=result.path.name), stop)
    answers = [loaded.tokenizer.decode(reader.greedy(prompt_ids(loaded.tokenizer, c), 48)) for c in convs]
    same = sum(a.strip() == g.strip() for a, g in zip(answers, generated))
    assert same >= 5, list(zip(answers, generated))
