"""`sftlab chat`: history, commands and stdin."""

import io
import subprocess
import sys


def test_chat_keeps_history_and_handles_commands(lively_model_dir, monkeypatch):
    from sftlab.rundir import load_run
    from sftlab.serve.chat import chat_loop

    loaded = load_run(str(lively_model_dir))
    seen = []
    render = loaded.tokenizer.apply_chat_template
    monkeypatch.setattr(loaded.tokenizer, "apply_chat_template", lambda msgs, **kw: seen.append(list(msgs)) or render(msgs, **kw))
    lines = iter(["hello", "and again", "/system be brief", "fresh start", "/bogus", "/exit", "never read"])
    out = io.StringIO()
    assert chat_loop(loaded, None, 6, 0.0, 1.0, read=lambda prompt: next(lines), out=out) == 3
    assert [len(m) for m in seen] == [1, 3, 2]  # turn 2 sees turn 1; /system resets and adds a system message
    assert seen[2][0] == {"role": "system", "content": "be brief"}
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "unknown command /bogus" in text


def test_chat_cli_through_stdin(lively_model_dir):
    proc = subprocess.run([sys.executable, "-m", "sftlab", "chat", str(lively_model_dir), "--temperature", "0",
                           "--max-new-tokens", "5"], input="hi\nsecond turn\n", capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
