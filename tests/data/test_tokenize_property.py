"""Property (docs/correctness.md rule 1): for random conversations, the supervised tokens decode to exactly the
assistant contents, each followed by its end-of-turn token, for every template."""

import pytest
from helpers import decode, encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftlab.data.formats import Conversation, Message
from sftlab.data.tokenize import IGNORE

ALPHABET = st.sampled_from(list("abcxyz ABC019 .,!?'\"-_:;()\n\t#*") + list("你好世界中文ßé😀"))
TEXT = st.text(ALPHABET, min_size=1, max_size=40).filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    msgs = [Message("system", draw(TEXT))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        msgs += [Message("user", draw(TEXT)), Message("assistant", draw(TEXT))]
    return Conversation(messages=tuple(msgs), origin="hypothesis")


def expected(template, tok, conv):
    replies = [m.content for m in conv.messages if m.role == "assistant"]
    if template == "llama2":
        return "".join(f" {c} {tok.eos_token}" for c in replies)
    return "".join(c + tok.eos_token for c in replies)


@pytest.mark.parametrize("template", ["chatml", "auto", "llama2", "alpaca"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations())
def test_supervised_tokens_are_exactly_the_replies(smol_tok, template, conv):
    [enc] = encoder(smol_tok, template).encode(conv)
    supervised = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert decode(smol_tok, supervised) == expected(template, smol_tok, conv)
    assert len(enc.input_ids) == len(enc.labels)
