"""`sftlab generate` on runs of the tiny model: the saved template, end-of-turn, side by side with the base."""

import json

from sftlab.cli import main


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
