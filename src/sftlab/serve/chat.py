"""`sftlab chat`: a terminal conversation with streamed replies and the model's saved chat template."""

from __future__ import annotations

import sys

import torch

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message and reset), /exit"


def chat_loop(loaded, system: str | None, max_new_tokens: int, temperature: float, top_p: float,
              read=input, out=sys.stdout) -> int:  # fmt: skip
    """Read user turns until /exit or end of input; returns the number of replies given."""
    from transformers import TextStreamer

    from sftlab.data.templates import end_of_turn_ids
    from sftlab.generate import Sampling, inference_mode

    tok, model = loaded.tokenizer, loaded.model
    sampling = Sampling(max_new_tokens, temperature, top_p)
    eos = sorted(end_of_turn_ids(tok))

    class _Printer(TextStreamer):  # streams decoded text as it is generated
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    history = _start(system)
    replies = 0
    out.write(f"{HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return replies
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return replies
        if line == "/reset":
            history = _start(system)
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            history = _start(system)
            out.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        inputs = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out.write("assistant> ")
        out.flush()
        with inference_mode(model), torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, streamer=_Printer(tok, skip_prompt=True,
                                 skip_special_tokens=True), **sampling.generate_kwargs())  # fmt: skip
        reply = tok.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        replies += 1


def _start(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []
