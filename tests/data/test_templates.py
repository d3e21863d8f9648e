"""docs/correctness.md rules 1 and 2 for every template: response-only masks, and training text == inference text."""

import types
from dataclasses import replace

import pytest
from helpers import conv, decode, encoder, supervised_runs

from sftlab.data.formats import RecordProblem
from sftlab.data.templates import ChatTemplate, resolve_template
from sftlab.data.tokenize import IGNORE
from sftlab.errors import ConfigError

CUSTOM = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATES = ["auto", "chatml", "llama2", "alpaca", CUSTOM]
IDS = ["auto", "chatml", "llama2", "alpaca", "custom"]

MULTI = conv(("user", "What is 2+2?"), ("assistant", "2+2 = 4."), ("user", "And 你好?"),
             ("assistant", " 你好 means hello.\n"), system="Be brief.")


def wrap(template, tok, content):
    """The text a template's reply piece must supervise: content plus its end-of-turn token."""
    if template == "llama2":  # the space after [/INST] is generated with the reply
        return f" {content} {tok.eos_token}"
    return content + tok.eos_token


@pytest.mark.parametrize("template", TEMPLATES, ids=IDS)
def test_training_text_is_byte_identical_to_the_rendered_conversation(smol_tok, template):
    [enc] = encoder(smol_tok, template).encode(MULTI)
    assert decode(smol_tok, enc.input_ids) == ChatTemplate(smol_tok, template).render(MULTI.messages)


@pytest.mark.parametrize("template", TEMPLATES, ids=IDS)
def test_prompt_tokens_equal_inference_and_reply_tokens_equal_generation(smol_tok, template):
    tpl = ChatTemplate(smol_tok, template)
    [enc] = encoder(smol_tok, template).encode(MULTI)
    runs = supervised_runs(enc.input_ids, enc.labels)
    replies = [i for i, m in enumerate(MULTI.messages) if m.role == "assistant"]
    assert len(runs) == len(replies)
    for (start, _), i in zip(runs, replies):
        prompt = tpl.render(MULTI.messages[:i], add_generation_prompt=True)
        # What inference feeds the model: the prompt tokenized whole, as apply_chat_template does.
        assert enc.input_ids[:start] == smol_tok(prompt, add_special_tokens=False)["input_ids"]
        # What the model generates after it: the reply piece on its own.
        piece = tpl.render(MULTI.messages[: i + 1])[len(prompt):]
        piece_ids = smol_tok(piece, add_special_tokens=False)["input_ids"]
        assert enc.input_ids[start : start + len(piece_ids)] == piece_ids


@pytest.mark.parametrize("template", TEMPLATES, ids=IDS)
def test_only_replies_and_their_end_of_turn_carry_loss(smol_tok, template):
    [enc] = encoder(smol_tok, template).encode(MULTI)
    runs = supervised_runs(enc.input_ids, enc.labels)
    replies = [m.content for m in MULTI.messages if m.role == "assistant"]
    assert [decode(smol_tok, ids) for _, ids in runs] == [wrap(template, smol_tok, c) for c in replies]
    for start, ids in runs:  # the token after end-of-turn (separator or next header) carries no loss
        assert ids[-1] == smol_tok.eos_token_id
        end = start + len(ids)
        assert end == len(enc.labels) or enc.labels[end] == IGNORE


def test_chatml_newline_after_im_end_is_not_trained(smol_tok):
    [enc] = encoder(smol_tok, "chatml").encode(conv(("user", "hi"), ("assistant", "yo")))
    tokens = [decode(smol_tok, [t]) for t in enc.input_ids]
    supervised = [t for t, label in zip(tokens, enc.labels) if label != IGNORE]
    assert supervised == ["yo", "<|im_end|>"]
    assert tokens[-1] == "\n" and enc.labels[-1] == IGNORE
    assert "<|im_start|>" not in supervised and "assistant" not in supervised


def test_reply_pieces_are_tokenized_apart_from_the_header(smol_tok):
    # A reply that starts with spaces: tokenizing the whole string merges the header's "\n" with the
    # first space into one "\n " token that the model never sees after the generation prompt.
    c = conv(("user", "hi"), ("assistant", "  indented"))
    [enc] = encoder(smol_tok, "chatml").encode(c)
    whole = smol_tok(ChatTemplate(smol_tok, "chatml").render(c.messages), add_special_tokens=False)["input_ids"]
    prompt = smol_tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.input_ids != whole  # the naive whole-string tokenization differs at the boundary


def test_train_on_last_and_all(smol_tok):
    [last] = encoder(smol_tok, "chatml", "last").encode(MULTI)
    runs = supervised_runs(last.input_ids, last.labels)
    assert [decode(smol_tok, ids) for _, ids in runs] == [" 你好 means hello.\n<|im_end|>"]
    [everything] = encoder(smol_tok, "chatml", "all").encode(MULTI)
    assert everything.labels == everything.input_ids
    # Token boundaries never depend on what is trained.
    assert last.input_ids == everything.input_ids == encoder(smol_tok, "chatml").encode(MULTI)[0].input_ids


def test_auto_template_default_system_prompt_is_not_trained(smol_tok):
    [enc] = encoder(smol_tok, "auto").encode(conv(("user", "hi"), ("assistant", "yo")))
    text = decode(smol_tok, enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert [decode(smol_tok, ids) for _, ids in supervised_runs(enc.input_ids, enc.labels)] == ["yo<|im_end|>"]


def test_template_that_rewrites_history_trains_each_turn_as_inference_renders_it(smol_tok):
    # Like templates that strip earlier replies: turn 1 renders differently inside the whole chat, so each
    # turn is its own example: the inference prompt up to it, and the turn as rendered when last.
    hides = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'A: ...\n' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    template = ChatTemplate(smol_tok, hides)
    examples = encoder(smol_tok, hides).encode(MULTI)
    replies = [i for i, m in enumerate(MULTI.messages) if m.role == "assistant"]
    assert len(examples) == len(replies) == 2
    for enc, i in zip(examples, replies):
        prompt = template.render(MULTI.messages[:i], add_generation_prompt=True)
        assert decode(smol_tok, enc.input_ids) == template.render(MULTI.messages[: i + 1])
        assert prompt.endswith("assistant: ") and ("A: ..." in prompt) == (i > replies[0])
        [(_, ids)] = supervised_runs(enc.input_ids, enc.labels)
        assert decode(smol_tok, ids) == MULTI.messages[i].content + "<|im_end|>"
    [last] = encoder(smol_tok, hides, "last").encode(MULTI)
    assert last.input_ids == examples[-1].input_ids


def test_a_reply_that_does_not_follow_its_generation_prompt_is_refused(smol_tok):
    # The generation prompt changes once there is history: the rendered turn never follows it.
    moves = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' if messages | length < 3 else 'model: ' }}{% endif %}")
    with pytest.raises(RecordProblem, match="does not follow its own generation prompt"):
        encoder(smol_tok, moves).encode(MULTI)


def _plain(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.mark.parametrize("direct", ["differs", "fails"])
def test_a_direct_render_that_differs_from_transformers_is_never_used(smol_tok, monkeypatch, direct):
    # The first call of each shape renders both ways; on a difference (or a failure of the direct path)
    # every render goes through transformers' render_jinja_template from then on.
    tpl = ChatTemplate(smol_tok, "chatml")
    calls = []

    def wrong(self, chats, *args):
        calls.append(1)
        return ["x"] * len(chats) if direct == "differs" else 1 / 0

    monkeypatch.setattr(ChatTemplate, "_render_direct", wrong)
    messages = MULTI.messages
    theirs = smol_tok.apply_chat_template(_plain(messages), chat_template=tpl.source, tokenize=False)
    assert tpl.render(messages) == theirs
    assert tpl._agreed is None and calls == [1]
    assert tpl.render(messages) == theirs
    assert tpl.render(messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert calls == [1]


def test_template_kwargs_named_like_the_renderers_own_arguments_reach_it_as_arguments(smol_tok):
    # `documents` in data.template_kwargs is apply_chat_template's documents argument, as it always was.
    source = "{% for d in documents %}[{{ d.title }}]{% endfor %}{% for m in messages %}{{ m.content }}|{% endfor %}"
    docs = [{"title": "Paris", "text": "capital"}]
    tpl = ChatTemplate(smol_tok, source, {"documents": docs})
    messages = MULTI.messages[1:3]
    assert tpl.render(messages) == smol_tok.apply_chat_template(_plain(messages), chat_template=source,
                                                                documents=docs, tokenize=False)  # fmt: skip
    assert tpl.render(messages).startswith("[Paris]") and tpl._agreed is None


def test_a_direct_render_gives_reasoning_under_every_name_transformers_gives_it(smol_tok):
    # A template that knows reasoning_content but reads `thinking` (gpt-oss style) gets it, as from transformers.
    source = ("{% for m in messages %}{{ m.role }}:{% if m.thinking is defined %}({{ m.thinking }}){% endif %}"
              "{{ m.content }}|{% endfor %}{# reasoning_content #}")  # fmt: skip
    tpl = ChatTemplate(smol_tok, source)
    c = conv(("user", "2+2?"), ("assistant", "4."))
    c = replace(c, messages=(c.messages[0], replace(c.messages[1], reasoning="Two and two.")))
    chat = [*_plain(c.messages[:1]), {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."}]
    theirs = smol_tok.apply_chat_template(chat, chat_template=source, tokenize=False)
    assert [tpl.render(c.messages) for _ in range(2)] == [theirs, theirs]
    assert "(Two and two.)4." in theirs and tpl._agreed


def test_the_direct_renders_sandbox_refuses_what_transformers_sandbox_refuses(smol_tok):
    # The direct path answers the sandbox's attribute check once per (type, attribute) and reads a loop's counters
    # directly: once it serves a shape, a template reaching a list's mutating method or an internal attribute
    # (of the loop too) is still refused at every render.
    import jinja2

    source = ("{% for m in messages %}{% if loop.first %}>{% endif %}{{ loop.index }}/{{ loop.revindex0 }}"
              "{{ loop._iterator }}{{ loop.cycle.__globals__ }}{{ m.content }}{% endfor %}"
              "[{{ messages.append }}{{ raise_exception.__globals__ }}]"
              "{% if messages|length > 2 %}{{ messages.pop() }}{% endif %}")  # fmt: skip
    tpl = ChatTemplate(smol_tok, source)
    short, long = MULTI.messages[1:3], MULTI.messages[1:5]  # one shape: the same roles and fields
    theirs = smol_tok.apply_chat_template(_plain(short), chat_template=tpl.source, tokenize=False)
    assert [tpl.render(short) for _ in range(2)] == [theirs, theirs] and theirs.endswith("[]")
    assert theirs.startswith(">1/1") and "2/0" in theirs
    assert tpl._agreed  # the second render was the direct one
    with pytest.raises(jinja2.exceptions.SecurityError):
        smol_tok.apply_chat_template(_plain(long), chat_template=tpl.source, tokenize=False)
    for _ in range(2):
        with pytest.raises(jinja2.exceptions.SecurityError):
            tpl.render(long)
    check = tpl._compiled.environment.is_safe_attribute
    for obj, attr, safe in ([[], "append", False], [[], "index", True], [{}, "update", False], [{}, "keys", True],
                            ["", "upper", True], [len, "__self__", False], [str, "mro", False]):  # fmt: skip
        assert [check(obj, attr, getattr(obj, attr)) for _ in range(2)] == [safe, safe], (obj, attr)


def test_template_errors_become_record_problems(smol_tok):
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RecordProblem, match="roles must alternate"):
        encoder(smol_tok, strict).encode(MULTI)


def test_template_names_and_files(smol_tok, tmp_path):
    assert resolve_template(smol_tok, "chatml")[0] == "chatml"
    (tmp_path / "t.jinja").write_text(CUSTOM)
    assert resolve_template(smol_tok, str(tmp_path / "t.jinja")) == ("t.jinja", CUSTOM)
    with pytest.raises(ConfigError, match=r"'chatlm' is not a template name"):
        resolve_template(smol_tok, "chatlm")
    with pytest.raises(ConfigError, match="the tokenizer has no chat template"):
        resolve_template(types.SimpleNamespace(chat_template=None), "auto")
