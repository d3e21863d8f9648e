"""`sftlab export --format hf`: the merged model in 16 bits, read back and checked, with its vLLM lines."""

import json

import pytest
import torch

from sftlab.cli import main
from sftlab.export.hf import export_hf
from sftlab.export.merge import ExportError


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory):
    """A LoRA run with eval data: a quantized export reports its eval loss beside the unquantized one's."""
    pytest.importorskip("bitsandbytes")
    from conftest import FIXTURES, tiny_config

    from sftlab.loop.train import train

    out = tmp_path_factory.mktemp("evaluated-run")
    cfg = tiny_config(tiny_model_dir, out, "train.method=lora", "train.lr=1e-2", f"data.eval=[{FIXTURES / 'train_small.jsonl'}]")
    train(cfg, say=lambda *a, **k: None)
    return out


def test_hf_export_is_a_bf16_merged_model_that_answers_like_the_run(lora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["export", str(lora_run), "--format", "hf", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformers: same greedy answer on 6/6" in printed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert f"vllm serve {out.resolve()} --chat-template {out.resolve() / 'chat_template.jinja'}" in printed
    assert f"--enable-lora --lora-modules {lora_run.name}={lora_run.resolve()} --max-lora-rank" in printed


def test_hf_export_refuses_other_types_and_adapter_only(lora_run, tmp_path, capsys):
    with pytest.raises(ExportError, match="--quant q8_0: --format hf writes bf16, f16, f32 or, with bitsandbytes, int8, nf4"):
        export_hf(str(lora_run), str(tmp_path / "x"), "q8_0")
    assert main(["export", str(lora_run), "--format", "hf", "--adapter-only", "--output", str(tmp_path / "y")]) == 2
    assert "the run directory is the adapter vLLM loads" in capsys.readouterr().err


@pytest.mark.parametrize("quant, layer_dtype", [("int8", "I8"), ("nf4", "U8")])
def test_hf_export_quantized_by_bitsandbytes_reloads_with_from_pretrained(evaluated_run, tmp_path, capsys, quant,
                                                                         layer_dtype):  # fmt: skip
    lora_run = evaluated_run
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / quant
    assert main(["export", str(lora_run), "--format", "hf", "--quant", quant, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transformers: same greedy answer on" in printed
    assert f"({quant}) against" in printed and "unquantized" in printed  # the eval loss before and after
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] if quant == "int8" else config["bnb_4bit_quant_type"] == "nf4"
    with safe_open(out / "model.safetensors", "pt") as f:  # on disk in 8 or 4 bits, not 16
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == layer_dtype
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert (out / "chat_template.jinja").is_file() and not list(tmp_path.glob(".unquantized-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == ("Linear8bitLt" if quant == "int8" else "Linear4bit")
