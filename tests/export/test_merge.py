"""`sftlab merge` on runs of the tiny model: the export's logits checked, a mismatch removed."""

import pytest
import torch
from conftest import tiny_config

from sftlab.cli import main
from sftlab.loop.train import train


def test_merge_exports_a_plain_model_with_the_adapters_logits(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.config import load_config

    out = tmp_path / "merged"
    assert main(["merge", str(lora_run), "--output", str(out)]) == 0
    assert "reloaded export matches the adapter" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_dir = load_config(lora_run / "config.yaml").model.name
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), lora_run).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    probe = torch.tensor([[1, 9690, 198, 2683, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        assert torch.allclose(merged(probe).logits, adapter(probe).logits, atol=1e-4)
        assert not torch.allclose(merged(probe).logits, base(probe).logits, atol=1e-3)  # the adapter did something
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_merge_refuses_an_export_that_does_not_match(lora_run, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    from sftlab.export.merge import ExportError, merge

    real = LoraModel.merge_and_unload

    def broken(self, *a, **k):
        model = real(self, *a, **k)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken)
    with pytest.raises(ExportError, match="logits differ"):
        merge(str(lora_run), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_merge_of_a_full_run_says_there_is_nothing_to_merge(tiny_model_dir, tmp_path, capsys):
    train(tiny_config(tiny_model_dir, tmp_path / "full", "train.method=full", "train.max_steps=1"), say=lambda *a, **k: None)
    assert main(["merge", str(tmp_path / "full"), "--output", str(tmp_path / "m")]) == 2
    assert "holds a full model already" in capsys.readouterr().err
