"""task: causal_lm end to end: tool-calling and reasoning records in each layout train, reload and show in
`data inspect`; the saved model stops at its template's end of turn under plain transformers."""

import json

import torch
from conftest import FIXTURES, tiny_config

from sftlab.cli import main
from sftlab.loop.train import train

QUIET = {"say": lambda *a, **k: None}


def test_tool_and_reasoning_records_train_reload_and_inspect(tiny_model_dir, tmp_path, capsys):
    from sftlab.rundir import load_run

    data = [FIXTURES / "tools_openai.jsonl", FIXTURES / "tools_sharegpt.json", FIXTURES / "reasoning.jsonl"]
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", "data.template=qwen", "train.max_steps=2", "data.max_length=512",
                      f"data.train=[{', '.join(map(str, data))}]")  # fmt: skip
    summary = train(cfg, **QUIET)
    assert summary["outcome"] == "completed"
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert [r["kept"] for r in report] == [2, 1, 3] and not any(r["dropped"] for r in report)
    notes = report[0]["notes"]
    assert notes["tool calls (trained)"] == 2 and notes["tool results (never trained)"] == 2
    assert report[2]["notes"]["reasoning trained, written as <think> before the content"] == 3
    assert report[2]["notes"]["assistant turns kept out of the loss (train: false)"] == 1
    loaded = load_run(str(tmp_path / "run"))
    assert "<tool_call>" in loaded.tokenizer.chat_template  # the template trained with, saved beside the model
    assert main(["data", "inspect", str(FIXTURES / "tools_openai.jsonl"), f"model.name={tiny_model_dir}",
                 "data.template=qwen", "--num", "1", "--color", "never"]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    assert "[[<tool_call>" in shown and '"city": "Paris"' in shown and "tool calls (trained)" in shown


def test_plain_transformers_generate_stops_at_the_templates_end_of_turn(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

    # A base whose EOS (<|im_end|>) is not the template's end of turn (<|eot_id|>), as with Llama-3 bases.
    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(base)
    tok.save_pretrained(base)
    train(tiny_config(base, tmp_path / "run", "data.template=llama3", "train.method=full", "train.max_steps=1"),
          **QUIET)  # fmt: skip
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert eot in saved["eos_token_id"] and tok.eos_token_id in saved["eos_token_id"]

    class EndOfTurnSecond(LogitsProcessor):  # an answer of one token, then the end of turn
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == start + 1:
                scores[:] = -1e9
                scores[:, eot] = 0
            return scores

    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    start = ids.shape[1]
    with torch.no_grad():
        out = tuned.generate(ids, max_new_tokens=8, do_sample=False, logits_processor=[EndOfTurnSecond()])
    assert out.shape[1] == start + 2 and out[0, -1] == eot
