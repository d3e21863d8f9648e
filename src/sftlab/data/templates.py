"""Chat templates, and the split of a rendered conversation into prompt and response pieces.

Every template is Jinja rendered by the tokenizer's own `apply_chat_template`, so training and
inference share one renderer. Response spans are found without `{% generation %}` tags (most real
templates lack them): the text of turn k's response is what rendering up to turn k adds after
rendering the prompt of turn k with the generation prompt. That is exactly what a model sees and
produces at inference, so the training text cannot drift from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from sftlab.data.formats import Conversation, RecordProblem
from sftlab.errors import ConfigError

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# Meta's Llama-2-chat layout: the system prompt folds into the first [INST] block, and the reply
# begins with the space after [/INST], so that space is generated (and trained) with the reply.
LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' }}"
    "{%- if loop.first and system is not none -%}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{%- endif -%}"
    "{{ message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' }}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '\n\n### Instruction:\n' + message['content'] }}"
    "{%- else -%}{{ '\n\n### Response:\n' + message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\n### Response:\n' }}{%- endif -%}"
)

BUILTIN = {"chatml": CHATML, "llama2": LLAMA2, "alpaca": ALPACA}


@dataclass(frozen=True)
class Segment:
    text: str
    response: bool  # an assistant reply (content + end-of-turn + whatever follows it in the template)
    last: bool = False  # the conversation's final reply (for train_on: last)


class ChatTemplate:
    """One Jinja chat template bound to a tokenizer."""

    def __init__(self, tokenizer, spec: str = "auto"):
        self.tokenizer = tokenizer
        self.name, self.source = resolve_template(tokenizer, spec)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.source, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def segments(self, conv: Conversation) -> list[Segment]:
        """Split the full rendering into alternating prompt and response pieces."""
        msgs = conv.messages
        try:
            full = self.render(msgs)
            replies = [i for i, m in enumerate(msgs) if m.role == "assistant"]
            pieces, pos = [], 0
            for k, i in enumerate(replies):
                start = self.render(msgs[:i], add_generation_prompt=True)
                end = self.render(msgs[: i + 1])
                if not (full.startswith(start) and full.startswith(end) and pos <= len(start) < len(end)):
                    raise RecordProblem(
                        "template mismatch",
                        f"template '{self.name}' renders assistant turn {k + 1} differently inside the "
                        "whole conversation than after its own prompt, so training text would differ from "
                        "inference; use another data.template (e.g. chatml) or a custom Jinja template",
                    )
                pieces.append(Segment(full[pos : len(start)], response=False))
                pieces.append(Segment(full[len(start) : len(end)], response=True, last=k == len(replies) - 1))
                pos = len(end)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise RecordProblem("template error", f"template '{self.name}' failed: {e}") from None
        if pos < len(full):
            pieces.append(Segment(full[pos:], response=False))
        return [p for p in pieces if p.text]


def resolve_template(tokenizer, spec: str) -> tuple[str, str]:
    """(name, Jinja source) for `data.template`."""
    if spec == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # some tokenizers carry several named templates
            source = source.get("default")
        if not source:
            raise ConfigError(
                "data.template is auto but the tokenizer has no chat template; "
                "set data.template to chatml, llama2, alpaca, a Jinja string or a .jinja file"
            )
        return "auto", source
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    if "{{" in spec or "{%" in spec:
        return "custom", spec
    path = Path(spec)
    if path.is_file():
        return path.name, path.read_text(encoding="utf-8")
    raise ConfigError(
        f"data.template: {spec!r} is not a template name (auto, {', '.join(BUILTIN)}), "
        "a Jinja string, or an existing template file"
    )


# Special tokens that close a turn in the templates we know; the tokenizer's EOS is always one too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def end_of_turn_ids(tok) -> set[int]:
    """Ids of special tokens that end an assistant turn: EOS plus known end-of-turn markers."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    special = set(tok.all_special_tokens) | {
        t.content for t in tok.added_tokens_decoder.values() if t.special
    }
    for token in END_OF_TURN_TOKENS:
        if token in special:
            ids.add(tok.convert_tokens_to_ids(token))
    return ids
