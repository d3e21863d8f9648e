"""Fields that change the distribution (logit_bias, penalties, top_k, stop_token_ids) and response_format,
through a live `sftlab serve` of the tiny model with the official client."""

import json

import pytest
from helpers import live_server


@pytest.fixture(scope="module")
def client(lively_model_dir):
    from openai import OpenAI

    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    engine = Engine(load_served(str(lively_model_dir)), max_batch=8)
    url, stop = live_server(create_app(engine, Limits(max_tokens=200), None, grace_s=2))
    yield OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), engine.served.ids[0], engine.served.tokenizer
    stop()


MESSAGES = [{"role": "user", "content": "tell me about rivers"}]


def _answer(client, **kw):
    c, model, _ = client
    out = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=kw.pop("max_tokens", 12), **kw)
    return out.choices[0]


def test_logit_bias_decides_greedy_tokens_and_stop_token_ids_end_the_answer(client):
    _, _, tok = client
    token = tok("River")["input_ids"][-1]
    assert _answer(client, temperature=0, logit_bias={str(token): 100}).message.content == tok.decode([token]) * 12
    plain = _answer(client, temperature=0)
    first = tok(plain.message.content, add_special_tokens=False)["input_ids"]
    stopped = _answer(client, temperature=0, extra_body={"stop_token_ids": [first[2]]})
    assert stopped.finish_reason == "stop" and stopped.message.content == tok.decode(first[:2])


def test_penalties_subtract_per_generated_token_and_top_k_1_is_greedy(client):
    import torch

    from sftlab.serve.engine import Adjust, Request, _adjust, _Row

    row = _Row(Request([1], "m", 5, adjust=Adjust(presence_penalty=0.5, frequency_penalty=0.25)), 0)
    row.counts = {3: 2, 7: 1}
    logits = torch.zeros(10)
    _adjust(row, logits)
    assert logits.tolist() == [0, 0, 0, -1.0, 0, 0, 0, -0.75, 0, 0]  # 0.25 * count + 0.5, generated tokens only
    _, _, tok = client
    token = tok("River")["input_ids"][-1]
    repeated = _answer(client, temperature=0, logit_bias={str(token): 12}).message.content
    varied = _answer(client, temperature=0, logit_bias={str(token): 12}, frequency_penalty=2.0).message.content
    assert repeated.count("River") >= 10 and varied.startswith("River")
    assert varied.count("River") < repeated.count("River")  # each use costs it 2 more
    plain = _answer(client, temperature=0, max_tokens=40).message.content
    sampled = _answer(client, temperature=1.0, max_tokens=40, seed=3, extra_body={"top_k": 1}).message.content
    assert sampled == plain


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "length_km": {"type": "integer",
          "minimum": 0, "maximum": 99999}, "wet": {"type": "boolean"}, "kind": {"enum": ["river", "creek"]}},
          "required": ["name", "length_km", "wet", "kind"], "additionalProperties": False}  # fmt: skip


def test_a_json_schema_answer_always_parses_and_follows_the_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "river", "schema": SCHEMA}}
    for seed in range(4):
        choice = _answer(client, temperature=1.0, seed=seed, max_tokens=150, response_format=fmt)
        value = json.loads(choice.message.content)
        assert choice.finish_reason == "stop" and set(value) == {"name", "length_km", "wet", "kind"}
        assert isinstance(value["length_km"], int) and isinstance(value["wet"], bool) and len(value["name"]) <= 12
        assert value["kind"] in ("river", "creek")


def test_json_object_answers_are_objects_or_cut_by_max_tokens(client):
    """A random model may write one endless string: then the answer is cut at max_tokens (finish_reason
    length), as OpenAI's is; whenever it stops by itself, it is one JSON object."""
    for seed in range(4):
        choice = _answer(client, temperature=1.0, seed=seed, max_tokens=60, response_format={"type": "json_object"})
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.lstrip().startswith("{")
