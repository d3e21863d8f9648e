"""Shared test helpers: build conversations and read supervised spans back out of labels."""

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import IGNORE, Encoder
from sftlab.models import end_of_turn_ids


def conv(*pairs, system=None):
    msgs = [Message("system", system)] if system else []
    for role, content in pairs:
        msgs.append(Message(role, content))
    return Conversation(messages=tuple(msgs), origin="test:1")


def encoder(tok, template="chatml", train_on="assistant"):
    return Encoder(tok, ChatTemplate(tok, template), train_on, end_of_turn_ids(tok))


def supervised_runs(input_ids, labels):
    """[(start, [ids...]), ...] for each maximal run of supervised tokens."""
    runs, start = [], None
    for i, label in enumerate(list(labels) + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, list(input_ids[start:i])))
            start = None
    return runs


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
