"""Chat templates, and the split of a rendered conversation into prompt and response pieces.

Every template is Jinja rendered by the tokenizer's own `apply_chat_template` (with the record's
`tools` and `data.template_kwargs`), so training and inference share one renderer. Response spans
are found without `{% generation %}` tags (most real templates lack them): turn k's response is
what rendering the conversation up to turn k adds after rendering its prompt with the generation
prompt, which is exactly what a model sees and produces at inference.

Where the whole conversation renders each turn that way, it is one example. Where it does not (a
template that renders earlier turns differently: reasoning kept only after the last user turn, the
system text moved into the last user turn, an end token only after the final turn), each assistant
turn becomes its own example: the inference prompt up to that turn, and that turn as rendered when
it is last (docs/correctness.md rule 9).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import jinja2
from jinja2.runtime import LoopContext

from sftlab.data.assistant import THINK_CLOSE, THINK_OPEN, knows_reasoning, lost_parts, template_message
from sftlab.data.chat_templates import BUILTIN, END_OF_TURN_TOKENS
from sftlab.data.conversation import Conversation, Message, RecordProblem
from sftlab.errors import ConfigError

try:  # the renderer inside apply_chat_template
    from transformers.utils.chat_template_utils import render_jinja_template as _render_jinja
except ImportError:  # pragma: no cover - another transformers layout: apply_chat_template itself
    _render_jinja = None
try:  # its compiled template and reasoning aliases: the same render without re-copying each prefix's messages
    from transformers.utils.chat_template_utils import _alias_reasoning_fields, _compile_jinja_template
    from transformers.utils.chat_template_utils import _plain_template_data
except ImportError:  # pragma: no cover - another transformers layout: render_jinja_template for every call
    _compile_jinja_template = None
# render_jinja_template's own parameters: a template kwarg of one of these names is an argument to it
_RENDER_PARAMETERS = {"conversations", "tools", "documents", "chat_template", "return_assistant_tokens_mask",
                      "continue_final_message", "add_generation_prompt"}  # fmt: skip

TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError)


@dataclass(frozen=True)
class Segment:
    text: str
    response: bool  # an assistant reply (content + end-of-turn + whatever follows it in the template)
    last: bool = False  # the conversation's final reply (for train_on: last)
    train: bool = True  # False: the message asked to stay out of the loss


@dataclass(frozen=True)
class Rendering:
    """A conversation as examples of prompt/response segments, and how it was handed to the template."""

    mode: "Mode"
    examples: list[list[Segment]]
    per_turn: bool = False  # one example per assistant turn (the template renders earlier turns differently)


@dataclass(frozen=True)
class Mode:
    """How a conversation is handed to a template that refuses the plain form."""

    merge_system: bool = False  # the system text opens the first user turn (templates without a system role)
    parts: bool = False  # content as a list of text parts (templates that index content[0]['text'])


class Built(NamedTuple):  # a tuple: made for every message of every conversation
    data: dict  # what render_jinja_template gets
    aliased: dict  # with its reasoning aliases, as it renders them
    kind: tuple  # the role and fields: part of a render's shape


class TemplateDicts:
    """One conversation's messages as template data, built once per mode for all the renders of its prefixes
    (the template cannot change them: its sandbox refuses every mutating call)."""

    def __init__(self, reasoning_field: str | None, messages):
        self.reasoning_field = reasoning_field
        self.messages = tuple(messages)
        self._built: dict[Mode, list[Built]] = {}

    def prefix(self, n: int, mode: Mode) -> list[Built]:
        """messages[:n] as the template gets them in `mode`: with the system text merged into the first user
        turn, the prefix of n messages is the merged list's first n - 1."""
        built = self._built.get(mode)
        if built is None:
            built = self._built[mode] = [self._build(m, mode.parts) for m in _merged(self.messages, mode)]
        folded = mode.merge_system and self.messages and self.messages[0].role == "system"
        return built[: max(n - 1, 0)] if folded else built[:n]

    def _build(self, m: Message, parts: bool) -> Built:
        data = template_message(m, self.reasoning_field, parts)
        aliased = _alias_reasoning_fields([data])[0] if _compile_jinja_template else data
        return Built(data, aliased, (data["role"], *data))


class ChatTemplate:
    """One Jinja chat template bound to a tokenizer, with the arguments every render gets."""

    def __init__(self, tokenizer, spec: str = "auto", kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.name, raw = resolve_template(tokenizer, spec)
        self.kwargs = dict(kwargs or {})
        self.source = bake_kwargs(raw, self.kwargs)  # rendered in training and saved with the run
        self.reasoning_field = knows_reasoning(raw)
        self._context = {**tokenizer.special_tokens_map, **self.kwargs}  # apply_chat_template's, beside the messages
        direct = _compile_jinja_template is not None and not _RENDER_PARAMETERS & self._context.keys()
        self._agreed: set[tuple] | None = set() if direct else None  # see _check_direct; None: never direct

    def render(self, messages, add_generation_prompt: bool = False, tools=(), mode: Mode = Mode()) -> str:
        return self.render_many([messages], add_generation_prompt, tools, mode)[0]

    def render_many(self, conversations, add_generation_prompt: bool = False, tools=(),
                    mode: Mode = Mode()) -> list[str]:  # fmt: skip
        """Each message list rendered by the renderer `apply_chat_template` uses, with its arguments: the same
        text, without its per-call cost."""
        built = [TemplateDicts(self.reasoning_field, msgs).prefix(len(msgs), mode) for msgs in conversations]
        return self._render_built(built, add_generation_prompt, tools, mode)

    def _prefixes(self, dicts: TemplateDicts, counts, add_generation_prompt: bool, tools, mode: Mode) -> list[str]:
        """The conversation's first n messages rendered, for each n in `counts`, from its dicts built once."""
        return self._render_built([dicts.prefix(n, mode) for n in counts], add_generation_prompt, tools, mode)

    def _render_built(self, built: list[list[Built]], add_generation_prompt: bool, tools, mode: Mode) -> list[str]:
        tools = list(tools) or None
        if _render_jinja is None:
            return [self.tokenizer.apply_chat_template([b.data for b in chat], tools=tools, chat_template=self.source,
                                                       tokenize=False, add_generation_prompt=add_generation_prompt,
                                                       **self.kwargs) for chat in built]  # fmt: skip
        shape = None
        if self._agreed is not None:  # what transformers' preparation branches on
            shape = (add_generation_prompt, tools is not None, mode.parts, frozenset(b.kind for c in built for b in c))
        if shape in (self._agreed or ()):
            return self._render_direct([[b.aliased for b in chat] for chat in built], add_generation_prompt, tools)
        chats = [[b.data for b in chat] for chat in built]
        rendered, _ = _render_jinja(conversations=chats, tools=tools, chat_template=self.source,
                                    add_generation_prompt=add_generation_prompt, **self._context)  # fmt: skip
        if self._agreed is not None:
            self._check_direct(shape, [[b.aliased for b in chat] for chat in built], add_generation_prompt, tools,
                               rendered)  # fmt: skip
        return rendered

    def _check_direct(self, shape: tuple, chats, add_generation_prompt: bool, tools, rendered: list[str]) -> None:
        """The first call of each shape (message roles and fields, content form, generation prompt, tools: what
        transformers' preparation branches on) also renders directly: from then on the direct path serves that
        shape where it gave the very text transformers gave, and no call at all where it did not."""
        try:
            same = self._render_direct(chats, add_generation_prompt, tools) == rendered
        except Exception:  # noqa: BLE001 -- a probe: whatever fails, the direct path is not used
            same = False
        if same:
            self._agreed.add(shape)
        else:
            self._agreed = None

    def _render_direct(self, chats: list[list[dict]], add_generation_prompt: bool, tools) -> list[str]:
        """What `render_jinja_template` renders, from transformers' own compiled template, on messages with its
        reasoning aliases, without its copy of every message into plain JSON types on every render:
        assistant.template_message builds these dicts of text and JSON values only, never None, so that copy
        would change nothing (the tools are copied once, as there)."""
        template = self._compiled
        tools = _plain_template_data(tools)
        return [template.render(messages=chat, tools=tools, documents=None,
                                add_generation_prompt=add_generation_prompt, **self._context) for chat in chats]

    @cached_property
    def _compiled(self) -> jinja2.Template:
        """The template compiled in an overlay of the environment transformers renders it in (its sandbox,
        filters and extensions), with its globals in a dict: jinja copies them into every render's context, and
        copying the ChainMap it keeps them in costs about a third of a short render."""
        environment = _compile_jinja_template(self.source).environment.overlay()
        environment.is_safe_attribute = _memoized_safety(environment.is_safe_attribute)
        environment.getattr = _direct_loop_counters(environment.getattr)
        compiled = environment.from_string(self.source)
        compiled.globals = dict(compiled.globals)
        return compiled

    def mode(self, conv: Conversation) -> Mode:
        """The first form of the conversation this template renders (plain first)."""
        return self._first_render(conv, TemplateDicts(self.reasoning_field, conv.messages))[0]

    def _first_render(self, conv: Conversation, dicts: TemplateDicts) -> tuple[Mode, str]:
        """(mode, the whole conversation rendered in it) for the first form the template takes."""
        first_error = None
        merge = (False, True) if conv.messages and conv.messages[0].role == "system" else (False,)
        for mode in (Mode(m, p) for m in merge for p in (False, True)):
            try:
                return mode, self._prefixes(dicts, [len(conv.messages)], False, conv.tools, mode)[0]
            except TEMPLATE_ERRORS as e:
                first_error = first_error or e
        raise RecordProblem("template error", f"template '{self.name}' cannot render this conversation: "
                            f"{first_error}; use another data.template or fix the record")  # fmt: skip

    def examples(self, conv: Conversation, train_on: str) -> Rendering:
        """The conversation as examples of prompt/response segments: one when the full render holds every
        turn as inference renders it, else one per assistant turn. `train_on: all` keeps the full render."""
        dicts = TemplateDicts(self.reasoning_field, conv.messages)
        mode, full = self._first_render(conv, dicts)
        try:
            lost = lost_parts(conv, full)
            if lost:
                raise RecordProblem("template drops tool calls", f"template '{self.name}' does not render "
                                    f"{', '.join(lost)}; use a template with tool support (e.g. data.template=qwen "
                                    "or llama3) or the model's own")  # fmt: skip
            whole = self._split(conv, full, mode, dicts)
            if whole is not None:
                return Rendering(mode, [whole])
            if train_on == "all":  # every token trains: the full render as it is
                return Rendering(mode, [[Segment(full, response=False)]])
            return Rendering(mode, self._per_turn(conv, mode, train_on, dicts), per_turn=True)
        except TEMPLATE_ERRORS as e:
            raise RecordProblem("template error", f"template '{self.name}' failed: {e}") from None

    def _split(self, conv: Conversation, full: str, mode: Mode, dicts: TemplateDicts) -> list[Segment] | None:
        """Alternating prompt and response pieces of the full render, or None where a turn inside it
        differs from that turn rendered last after its own prompt."""
        msgs, replies = conv.messages, _replies(conv)
        starts = self._prefixes(dicts, replies, True, conv.tools, mode)
        inner = [i for i in replies if i + 1 < len(msgs)]  # a reply that ends the conversation ends at `full`
        ends = dict(zip(inner, self._prefixes(dicts, [i + 1 for i in inner], False, conv.tools, mode)))
        pieces, pos = [], 0
        for k, (i, start) in enumerate(zip(replies, starts)):
            end = ends.get(i, full)
            if not (full.startswith(start) and full.startswith(end) and pos <= len(start) < len(end)):
                return None
            reply = full[len(start) : len(end)]
            if not _holds_reasoning(msgs[i], reply):
                return None
            pieces.append(Segment(full[pos : len(start)], response=False))
            pieces.append(Segment(reply, response=True, last=k == len(replies) - 1, train=msgs[i].train))
            pos = len(end)
        if pos < len(full):
            pieces.append(Segment(full[pos:], response=False))
        return [p for p in pieces if p.text]

    def _per_turn(self, conv: Conversation, mode: Mode, train_on: str, dicts: TemplateDicts) -> list[list[Segment]]:
        replies = _replies(conv)
        wanted = replies[-1:] if train_on == "last" else replies
        examples = []
        for i in wanted:
            if not conv.messages[i].train:
                continue
            [prompt] = self._prefixes(dicts, [i], True, conv.tools, mode)
            reply = self._reply_as_last(conv, i, prompt, mode, dicts)
            examples.append([Segment(prompt, response=False), Segment(reply, True, last=i == replies[-1])])
        return examples

    def _reply_as_last(self, conv: Conversation, i: int, prompt: str, mode: Mode, dicts: TemplateDicts) -> str:
        """What inference must generate after `prompt` for assistant turn i: that turn as the template
        renders it when it is the conversation's last."""
        message = conv.messages[i]
        [as_last] = self._prefixes(dicts, [i + 1], False, conv.tools, mode)
        if as_last.startswith(prompt):
            reply = as_last[len(prompt) :]
        else:
            [before] = self._prefixes(dicts, [i], False, conv.tools, mode)
            if not prompt.startswith(before):
                raise _mismatch(self.name, i, message)
            start = _turn_start(before, as_last, message.content)
            generation_prompt, turn = prompt[len(before) :], as_last[start:]
            reply = _after_generation_prompt(generation_prompt, turn, message)
            if reply is None:
                raise _mismatch(self.name, i, message)
        if not _holds_reasoning(message, reply):
            raise RecordProblem("reasoning dropped by template", f"template '{self.name}' does not render the "
                                f"reasoning of assistant message {i}; set data.reasoning=drop to train without "
                                "it, or use a template that renders reasoning_content")  # fmt: skip
        return reply


def _memoized_safety(is_safe_attribute):
    """The sandbox's attribute check, answered once per (type, attribute): the immutable sandbox decides from
    the name and the object's type alone (private names, a function's or frame's internals, a list's or
    dict's mutating methods), and its isinstance tests against abstract types were a quarter of a render
    (`loop.first` in every turn)."""
    known: dict[tuple[type, str], bool] = {}

    def check(obj, attr: str, value) -> bool:
        key = (type(obj), attr)
        if key not in known:
            known[key] = is_safe_attribute(obj, attr, value)
        return known[key]

    return check


# A for-loop's counters: bools and ints, public names, never str.format (what the sandbox's getattr screens for).
_LOOP_COUNTERS = frozenset({"first", "last", "index", "index0", "length", "revindex", "revindex0", "depth", "depth0"})


def _direct_loop_counters(sandboxed_getattr):
    """`loop.first` (read in every turn of every render) and the loop's other counters read directly, the value
    the sandbox would let through; every other attribute goes through the sandbox."""

    def get(obj, attribute: str):
        if type(obj) is LoopContext and attribute in _LOOP_COUNTERS:
            return getattr(obj, attribute)
        return sandboxed_getattr(obj, attribute)

    return get


def _replies(conv: Conversation) -> list[int]:
    return [i for i, m in enumerate(conv.messages) if m.role == "assistant"]


def _merged(messages, mode: Mode) -> list[Message]:
    """The messages as the template gets them: a leading system message folded into the first user turn."""
    messages = list(messages)
    if not (mode.merge_system and messages and messages[0].role == "system"):
        return messages
    system, rest = messages[0], messages[1:]
    if rest and rest[0].role == "user":
        rest[0] = replace(rest[0], content=f"{system.content}\n\n{rest[0].content}")
    return rest


def _holds_reasoning(message: Message, reply: str) -> bool:
    return not message.reasoning or message.reasoning.strip() in reply


def _turn_start(before: str, as_last: str, content: str) -> int:
    """Where the last turn begins in `as_last`: after the last place, before the turn's content, where the
    longest tail of `before` (the render up to the turn) stands. The rest of `before` may sit elsewhere
    in `as_last` (a system text the template moves into the last user turn)."""
    region = as_last[: as_last.rfind(content)] if content and content in as_last else as_last
    lo, hi = 0, len(before)
    while lo < hi:  # a tail found implies every shorter tail is found: binary search its length
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if before[-mid:] in region else (lo, mid - 1)
    return region.rfind(before[-lo:]) + lo if lo else 0


def _after_generation_prompt(generation_prompt: str, turn: str, message: Message) -> str | None:
    """The reply after the generation prompt: the turn past it, or where the turn does not start with it, the one case
    known: a prompt that opens a reasoning block the rendered turn lacks (DeepSeek-R1 distills), where
    inference generates the reasoning, closes the block and answers."""
    if turn.startswith(generation_prompt):
        return turn[len(generation_prompt) :]
    common = 0
    while common < min(len(generation_prompt), len(turn)) and generation_prompt[common] == turn[common]:
        common += 1
    if generation_prompt[common:].strip() != THINK_OPEN:
        return None
    return f"{message.reasoning or ''}\n{THINK_CLOSE}\n\n" + turn[common:].lstrip("\n")


def _mismatch(name: str, i: int, message: Message) -> RecordProblem:
    hint = ("; its generation prompt may leave no room for reasoning (e.g. enable_thinking: false): set "
            "data.reasoning=drop" if message.reasoning else "")
    return RecordProblem("template mismatch", f"template '{name}' renders assistant message {i} in a way that "
                         "does not follow its own generation prompt, so training text would differ from inference"
                         f"{hint}; use another data.template (e.g. chatml) or a custom Jinja template")  # fmt: skip


def bake_kwargs(source: str, kwargs: dict) -> str:
    """The template with data.template_kwargs set at its top, so whatever renders the saved template
    (transformers, vLLM, llama.cpp) renders as training did."""
    sets = "".join(f"{{%- set {k} = {_jinja_literal(v)} -%}}" for k, v in kwargs.items())
    return sets + source


def _jinja_literal(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_jinja_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"data.template_kwargs: {value!r} is not a YAML scalar, list or mapping")


def resolve_template(tokenizer, spec: str) -> tuple[str, str]:
    """(name, Jinja source) for `data.template`."""
    if spec == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # some tokenizers carry several named templates
            source = source.get("default")
        if not source:
            raise ConfigError(
                "data.template is auto but the tokenizer has no chat template; "
                f"set data.template to one of {', '.join(BUILTIN)}, a Jinja string or a .jinja file"
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


def end_of_turn_ids(tok) -> set[int]:
    """Ids of special tokens that end an assistant turn: EOS plus known end-of-turn markers."""
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    for token in END_OF_TURN_TOKENS:
        if token in special:
            ids.add(tok.convert_tokens_to_ids(token))
    return ids


def stop_ids(tokenizer, source: str) -> list[int]:
    """EOS and the end-of-turn tokens `source` writes after a reply: where generation must stop."""
    candidates = end_of_turn_ids(tokenizer)
    sample = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        text = tokenizer.apply_chat_template(sample, chat_template=source, tokenize=False)
        written = set(tokenizer(text, add_special_tokens=False)["input_ids"]) & candidates
    except TEMPLATE_ERRORS:  # a template that refuses this sample: every known end-of-turn token
        written = candidates
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(written | eos)
