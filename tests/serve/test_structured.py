"""Structured output: decoding under a response_format constraint always gives JSON that follows the schema.

The "model" here is mostly random logits (seeded): if the output is valid, the mask did all the work. Random
logits alone rarely close an unbounded string among ~49k allowed tokens, so `_closing_bias` makes a model that
likes quotes and brackets: it finishes within the step budget but still proposes plenty of tokens that are
invalid where they stand, which the mask must rule out.
"""

import json

import pytest
import torch

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "nickname": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "score", "active", "color"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["id", "tags"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["user", "items"],
    "additionalProperties": False,
}
# Every value bounded and no free whitespace: any path through it is short, so even an unbiased model finishes.
FINITE = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 50},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b", "c"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["label", "count", "ok", "kind", "flags"],
    "additionalProperties": False,
}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """This module's torch work is vocabulary-sized vectors, too small for intra-op threads: on a busy 2-core
    machine each op waited milliseconds for its second thread, which made the module 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eos(smol_tok):
    from sftlab.data.templates import end_of_turn_ids

    return end_of_turn_ids(smol_tok)


@pytest.fixture(scope="module")
def closing_bias(smol_tok) -> torch.Tensor:
    """+6 on tokens with a quote, bracket or comma in them (their text, byte-level, shows them literally)."""
    pieces = smol_tok.convert_ids_to_tokens(list(range(len(smol_tok))))
    return torch.tensor([6.0 if any(c in p for c in '"}],') else 0.0 for p in pieces])


def _decode(constraint, next_logits, eos: set[int], steps: int = 300, generator=None) -> tuple[list[int], object]:
    """Tokens chosen under the constraint (greedy, or sampled with `generator`), until done, EOS or `steps`.

    Checks the EOS rule on the way: masked at every step before the JSON is complete."""
    state, ids = constraint.start(), []
    for _ in range(steps):
        logits = next_logits(ids)
        state.mask(logits)
        if not state.accepting():
            assert all(logits[e] == float("-inf") for e in eos)
        if generator is None:
            token = int(logits.argmax())
        else:  # Gumbel-max: a draw from softmax(logits), at a fraction of torch.multinomial's cost here
            gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
            token = int((logits + gumbel).argmax())
        assert logits[token] > float("-inf")
        if token in eos:
            break
        state.advance(token)
        ids.append(token)
        if state.done():
            break
    return ids, state


def _random_model(vocab: int, seed: int, bias: torch.Tensor | None = None):
    generator = torch.Generator().manual_seed(seed)

    def next_logits(ids):
        logits = torch.randn(vocab, generator=generator) * 2
        if bias is not None:
            logits[: len(bias)] += bias
        return logits

    return next_logits


def _check(value, schema: dict, where: str = "$") -> None:
    """Validate against the schema subset used here (jsonschema does it fully when installed)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None and where == "$":
        jsonschema.validate(value, schema)
    names = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        fits = [k for k in kinds if (isinstance(value, names[k]) if k in names else
                                     isinstance(value, int if k == "integer" else (int, float)) and
                                     not isinstance(value, bool))]  # fmt: skip
        assert fits, f"{where}: {value!r} is not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: unexpected keys {set(value) - set(props)}"
        for key, sub in value.items():
            if key in props:
                _check(sub, props[key], f"{where}.{key}")
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), where
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, str) and "maxLength" in schema:
        assert len(value) <= schema["maxLength"], where
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{where}: {value}"


@pytest.mark.parametrize("schema", [PERSON, NESTED, FINITE], ids=["person", "nested", "finite"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_output_parses_and_follows_the_schema(smol_tok, eos, closing_bias, schema, sampled):
    from sftlab.serve.structured import compile_format

    constraint = compile_format(_schema_format(schema), smol_tok)
    for seed in range(3):
        generator = torch.Generator().manual_seed(100 + seed) if sampled else None
        ids, state = _decode(constraint, _random_model(len(smol_tok), seed, closing_bias), eos, generator=generator)
        text = smol_tok.decode(ids)
        assert state.done(), f"not finished in 300 tokens: {text!r}"
        _check(json.loads(text), schema)


def test_an_unbiased_random_model_fills_a_bounded_schema(smol_tok, eos):
    from sftlab.serve.structured import compile_format

    constraint = compile_format(_schema_format(FINITE), smol_tok)
    for seed in range(3):
        ids, state = _decode(constraint, _random_model(len(smol_tok), seed), eos)
        assert state.done()
        _check(json.loads(smol_tok.decode(ids)), FINITE)


def test_json_object_gives_an_object_done_at_its_closing_brace(smol_tok, eos, closing_bias):
    from sftlab.serve.structured import compile_format

    constraint = compile_format({"type": "json_object"}, smol_tok)
    for seed in range(4):
        ids, state = _decode(constraint, _random_model(len(smol_tok), seed, closing_bias), eos)
        text = smol_tok.decode(ids)
        assert state.done() and isinstance(json.loads(text), dict) and text.endswith("}")
        replay = constraint.start()
        for token in ids[:-1]:
            replay.advance(token)
            assert not replay.done()
        logits = torch.zeros(len(smol_tok))
        replay.mask(logits)
        assert all(logits[e] == float("-inf") for e in eos)  # before the closing brace: no EOS
        replay.advance(ids[-1])
        logits = torch.zeros(len(smol_tok))
        replay.mask(logits)
        assert replay.done() and set(torch.isfinite(logits).nonzero().view(-1).tolist()) <= eos  # after: only EOS


def test_eos_is_allowed_once_a_top_level_number_is_complete(smol_tok, eos):
    """A top-level number may go on (5, 57, ...): not done, but EOS becomes allowed after its first digit."""
    from sftlab.serve.structured import compile_format

    state = compile_format(_schema_format({"type": "integer"}), smol_tok).start()
    logits = torch.zeros(len(smol_tok))
    state.mask(logits)
    assert all(logits[e] == float("-inf") for e in eos)
    state.advance(smol_tok.convert_tokens_to_ids("5"))
    logits = torch.zeros(len(smol_tok))
    state.mask(logits)
    assert not state.done() and state.accepting() and all(logits[e] == 0 for e in eos)


def test_mask_covers_a_model_vocabulary_padded_past_the_tokenizer(smol_tok):
    from sftlab.serve.structured import compile_format

    state = compile_format({"type": "json_object"}, smol_tok).start()
    logits = torch.zeros(len(smol_tok) + 37)
    state.mask(logits)
    assert torch.isinf(logits[len(smol_tok) :]).all()
    allowed = {smol_tok.decode([t]) for t in torch.isfinite(logits).nonzero().view(-1).tolist()}
    assert allowed and all(text.startswith("{") for text in allowed)


def test_text_is_unconstrained_and_schemas_are_cached(smol_tok):
    from sftlab.serve.structured import compile_format

    assert compile_format({"type": "text"}, smol_tok) is None
    first = compile_format(_schema_format(PERSON), smol_tok)
    reordered = dict(reversed(list(PERSON.items())))
    assert compile_format(_schema_format(reordered), smol_tok) is first
    assert compile_format(_schema_format(NESTED), smol_tok) is not first


# (what is wrong, the response_format, what the message must say)
BAD_FORMATS = [
    ("not-an-object", "json", "response_format must be an object, not str"),
    ("unknown-type", {"type": "xml"}, "response_format.type must be one of"),
    ("no-json-schema", {"type": "json_schema"}, "response_format.json_schema must be an object, not missing"),
    ("no-schema", {"type": "json_schema", "json_schema": {"name": "x"}}, "schema must be an object, not missing"),
    ("typo", _schema_format({"type": "strnig"}), "Invalid type: strnig"),
    ("required", _schema_format({"type": "object", "required": "name"}), "'required'"),
    ("ref", _schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}), "/$defs/gone"),
    ("regex", _schema_format({"type": "string", "pattern": "(["}), "regex parse error"),
    ("bounds", _schema_format({"type": "array", "minItems": 3, "maxItems": 1}), "minItems (3) is greater than"),
    ("unsupported", _schema_format({"type": "object", "not": {"required": ["a"]}}), 'Unimplemented keys: ["not"]'),
    ("format", _schema_format({"type": "string", "format": "zipcode"}), "Unknown format: zipcode"),
]


@pytest.mark.parametrize(("response_format", "message"), [pytest.param(f, m, id=i) for i, f, m in BAD_FORMATS])
def test_a_bad_format_raises_value_error_naming_the_problem(smol_tok, response_format, message):
    from sftlab.serve.structured import compile_format

    with pytest.raises(ValueError, match="response_format") as raised:
        compile_format(response_format, smol_tok)
    assert message in str(raised.value)


def test_a_real_model_with_a_wider_vocabulary_decodes_valid_json(tiny_model_dir, smol_tok, eos):
    """A real forward pass (greedy, KV cache) whose logits are wider than the tokenizer: still valid JSON."""
    from transformers import AutoModelForCausalLM

    from sftlab.serve.structured import compile_format

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.resize_token_embeddings(len(smol_tok) + 40)  # as checkpoints pad theirs to a multiple of 64
    prompt = smol_tok.apply_chat_template([{"role": "user", "content": "Describe a thing as JSON."}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)  # fmt: skip
    constraint = compile_format(_schema_format(FINITE), smol_tok)
    cache, next_input = None, torch.tensor([list(prompt)])

    def next_logits(ids):
        nonlocal cache, next_input
        if ids:
            next_input = torch.tensor([[ids[-1]]])
        with torch.no_grad():
            out = model(input_ids=next_input, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[0, -1].float()
        assert logits.shape[0] == len(smol_tok) + 40
        return logits

    ids, state = _decode(constraint, next_logits, eos, steps=200)
    assert state.done()
    _check(json.loads(smol_tok.decode(ids)), FINITE)
