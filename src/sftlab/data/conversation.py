"""The one internal conversation type every data format becomes, and the error a bad record raises."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[dict, ...] = ()  # assistant: [{id?, type: function, function: {name, arguments: {...}}}]
    tool_call_id: str | None = None  # tool: the call this result answers
    name: str | None = None  # tool: the function's name, when the record gives it
    reasoning: str | None = None  # assistant: its reasoning trace (sftlab.data.assistant)
    train: bool = True  # assistant: False keeps this turn out of the loss (`train: false` / `weight: 0`)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...] = ()
    text: str | None = None  # format `text`: raw text trained whole, no chat template
    origin: str = ""  # "file:line" of the record it came from
    tools: tuple[dict, ...] = ()  # function schemas offered to the model (rendered by the template)
    id: str | None = None  # the record's own `id`, carried into the tokenized dataset
    metadata: dict | None = None  # the record's `metadata` object (source, category, difficulty, language, ...)
    loss_weight: float = 1.0  # scales this record's tokens in the loss (the record's times its dataset's)


class RecordProblem(Exception):
    """A record that cannot be used; `kind` is the short reason counted in reports."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind

    def __reduce__(self):  # a bad record read in the parent travels to the pipeline's workers as one
        return type(self), (self.kind, str(self))
