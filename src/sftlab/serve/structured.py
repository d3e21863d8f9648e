"""OpenAI's `response_format` by constrained decoding: every step, tokens that cannot continue valid JSON are masked.

Library: llguidance, because its one self-contained wheel (it pulls no torch, triton or CUDA) reads a Hugging Face
fast tokenizer directly and its Rust parser gives a full-vocabulary mask in about 0.1 ms a token on CPU, applied;
xgrammar pulls triton, outlines-core builds a vocabulary-wide index per schema, lm-format-enforcer is pure Python.

Use: `compile_format(response_format, tokenizer)` once per request (its ValueError is the client's fault: a 400),
then `constraint.start()` per sequence and, each step, `state.mask(logits)` before sampling and
`state.advance(token)` after; `state.done()` means the JSON is complete and the sequence should stop.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from llguidance import LLMatcher

# One-line JSON with fixed separators: with free whitespace a weak or unlucky model can emit newlines until
# max_tokens (whitespace is always allowed between tokens of JSON), and the compact form parses the same. Passed as
# llguidance overrides so that a schema's own "x-guidance" options cannot turn free whitespace back on.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHED_PER_TOKENIZER = 128  # clients resend the same few schemas; bound what an odd client can make us keep
_TYPES = ("text", "json_object", "json_schema")
_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


class Constraint:
    """A compiled response format for one tokenizer: shared by every request that sends the same schema."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_ids: list[int]):
        self._matcher = matcher  # never advanced itself: each sequence advances its own copy
        self.vocab_size = vocab_size  # the tokenizer's; a model's logits may be wider
        self.eos_ids = eos_ids  # allowed only once the JSON is complete

    def start(self) -> ConstraintState:
        """A fresh state for one sequence (a copy of the compiled matcher: about a microsecond)."""
        return ConstraintState(self._matcher.deep_copy(), self.vocab_size)


class ConstraintState:
    """Where one sequence is in its JSON; cost per token depends on the grammar, not on the length so far."""

    def __init__(self, matcher: LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # llguidance's packed mask: 1 = allowed

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens that cannot come next to -inf, in place, on a 1-D [vocab] tensor.

        EOS is allowed only once the JSON is complete. A model's vocabulary may be padded past the tokenizer's
        (to a multiple of 64, say): those ids are no token at all, so they are masked too."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"structured output failed: {self._matcher.get_error()}")
        known = min(self._vocab_size, logits.shape[-1])
        words = self._bits.astype("<u4", copy=False)  # token 32*w + k is bit k of word w: little-endian bytes
        allowed = np.unpackbits(words.view(np.uint8), count=known, bitorder="little")
        logits[known:] = float("-inf")
        if logits.device.type == "cpu" and logits.dtype in _NUMPY_FLOATS:
            # numpy, single-threaded: torch's masked_fill_ splits a vocabulary over its intra-op threads, and on a
            # busy CPU waiting for them cost milliseconds a token where numpy takes tens of microseconds.
            np.copyto(logits.numpy()[:known], -np.inf, where=allowed == 0)
        else:
            disallowed = torch.from_numpy(allowed == 0).to(logits.device)
            logits[:known].masked_fill_(disallowed, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Take the sampled token; one that the last mask ruled out is a bug in the caller, not the client's."""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"token {token_id} does not fit the response format: {self._matcher.get_error()}")

    def done(self) -> bool:
        """The JSON is complete and nothing may follow it (only EOS): the sequence should stop here."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def accepting(self) -> bool:
        """The text so far is complete JSON, though it may still go on (a top-level number can take more digits)."""
        return self._matcher.is_accepting()


def compile_format(response_format: dict, tokenizer) -> Constraint | None:
    """The constraint for an OpenAI `response_format`, or None for plain text.

    Raises ValueError, with what is wrong, for a malformed response_format, an invalid schema or a schema keyword
    that is not supported (the server answers 400). Compiled formats are cached per tokenizer and schema."""
    schema = _schema_of(response_format)
    if schema is None:
        return None
    try:
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"response_format: the schema is not plain JSON: {e}") from None
    with _LOCK:
        vocab = _vocab_of(tokenizer)
        constraint = vocab.schemas.get(key)
        if constraint is None:
            constraint = _compile(vocab, schema)
            vocab.schemas[key] = constraint
            if len(vocab.schemas) > _CACHED_PER_TOKENIZER:
                vocab.schemas.popitem(last=False)
        vocab.schemas.move_to_end(key)
    return constraint


def _schema_of(response_format) -> dict | None:
    """The JSON schema that `response_format` asks for (None: no constraint), checking its shape as OpenAI does."""
    kind = _object(response_format, "response_format").get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}  # OpenAI's JSON mode: any JSON object, never a bare string or array
    if kind != "json_schema":
        raise ValueError(f"response_format.type must be one of {', '.join(_TYPES)}, not {kind!r}")
    spec = _object(response_format.get("json_schema"), "response_format.json_schema")
    # "name" only labels the schema for the client, and "strict" needs nothing: the output always follows it.
    return _object(spec.get("schema"), "response_format.json_schema.schema")


def _object(value, what: str) -> dict:
    """`value` if it is a JSON object; a ValueError otherwise, as the server answers every ValueError with a 400."""
    if not isinstance(value, dict):
        got = "missing" if value is None else type(value).__name__
        raise ValueError(f"{what} must be an object, not {got}")  # noqa: TRY004 - the 400 contract, as above
    return value


class _Vocab:
    """llguidance's view of one tokenizer (about a second to build) and the formats compiled for it."""

    def __init__(self, tokenizer):
        import llguidance.hf

        from sftlab.data.templates import end_of_turn_ids

        # The engine stops a row on any of these, so they are the EOS the grammar allows once the JSON is complete.
        self.eos_ids = sorted(end_of_turn_ids(tokenizer)) or None
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=self.eos_ids)
        except ValueError as e:  # a slow (Python) tokenizer: llguidance reads only fast ones
            raise ValueError(f"response_format is not supported for this model's tokenizer: {e}") from None
        self.schemas: OrderedDict[str, Constraint] = OrderedDict()


_LOCK = threading.Lock()  # requests compile on the server's threads while the engine decodes on its own
_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Vocab, gone with the tokenizer


def _vocab_of(tokenizer) -> _Vocab:
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = _Vocab(tokenizer)
    return vocab


def _compile(vocab: _Vocab, schema: dict) -> Constraint:
    """Compile and check `schema`; llguidance names the offending keyword or value in its message."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as e:
        raise ValueError(f"response_format: invalid JSON schema: {e}") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, vocab.tokenizer)
    if failed:
        raise ValueError(f"response_format: unsupported or invalid JSON schema: {messages[0]}")
    matcher = LLMatcher(vocab.tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"response_format: unsupported or invalid JSON schema: {matcher.get_error()}")
    return Constraint(matcher, vocab.tokenizer.vocab_size, vocab.eos_ids or [])
