"""`sftlab export --format hf`: the merged model in 16 bits, read back and checked, with its vLLM lines."""

import json

import pytest
import torch

from sftlab.cli import main
from sftlab.export.hf import export_hf
from sftlab.export.merge import ExportError


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
    with pytest.raises(ExportError, match="--quant q8_0: --format hf writes bf16, f16, f32"):
        export_hf(str(lora_run), str(tmp_path / "x"), "q8_0")
    assert main(["export", str(lora_run), "--format", "hf", "--adapter-only", "--output", str(tmp_path / "y")]) == 2
    assert "the run directory is the adapter vLLM loads" in capsys.readouterr().err
