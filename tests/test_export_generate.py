"""`sftlab merge` and `sftlab generate` on runs of the tiny model."""

import json

import pytest
import torch
from conftest import tiny_config

from sftlab.cli import main
from sftlab.loop.train import train

QUIET = {"say": lambda *a, **k: None}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    train(tiny_config(tiny_model_dir, out, "train.method=lora", "train.lr=1e-2"), **QUIET)
    return out


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
    train(tiny_config(tiny_model_dir, tmp_path / "full", "train.method=full", "train.max_steps=1"), **QUIET)
    assert main(["merge", str(tmp_path / "full"), "--output", str(tmp_path / "m")]) == 2
    assert "holds a full model already" in capsys.readouterr().err


def test_generate_answers_prompts_side_by_side_with_the_base(lora_run, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ref"}]})
                       + "\n" + json.dumps({"prompt": "你好"}) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", str(lora_run), "--prompt", "alpha beta", "--prompts", str(prompts), "--base",
            "--max-new-tokens", "5", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "### alpha beta" in printed and "[tuned]" in printed and "[base]" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["response"], str) and isinstance(r["base_response"], str) for r in rows)
    assert rows[1]["messages"] == [{"role": "user", "content": "hi"}]  # the reference answer is not fed back


def test_generate_uses_the_saved_template_and_stops_at_end_of_turn(lora_run):
    from sftlab.generate import answer
    from sftlab.rundir import load_run

    loaded = load_run(str(lora_run))
    assert loaded.is_adapter
    text = answer(loaded, [{"role": "user", "content": "gamma"}], max_new_tokens=8, temperature=0.7, seed=1)
    assert isinstance(text, str) and "<|im_end|>" not in text


def test_generate_errors(lora_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert main(["generate", str(lora_run), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(["generate", str(lora_run)]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err


def test_train_command_end_to_end(tiny_model_dir, tmp_path, capsys):
    from conftest import FIXTURES

    out = tmp_path / "cli-run"
    argv = ["train", str(FIXTURES / "run_template.yaml"), f"model.name={tiny_model_dir}", f"train.output_dir={out}",
            f"data.train=[{FIXTURES / 'train_small.jsonl'}]", "train.max_steps=2", "train.report_to=[]"]
    assert main(argv) == 0
    assert "completed: 2/2 steps" in capsys.readouterr().out
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
