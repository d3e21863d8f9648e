"""OpenAI-compatible HTTP API over the engine: chat completions, completions, models, health.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}; one bad
request never takes the server down. create_app only wires FastAPI; what each route does is in Api and
the functions below it, which need no server or HTTP client to test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Request as HttpRequest  # at module level: FastAPI resolves string annotations here
from pydantic import BaseModel, ConfigDict, Field

from sftlab.auth import bearer, same_secret
from sftlab.generate import prompt_ids
from sftlab.serve.engine import Adjust, Closing, Engine, QueueFull, Request


@dataclass
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_n: int = 8
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # each stop string's length
    max_prompts: int = 64  # prompts in one /v1/completions request


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class ContentPart(BaseModel):
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this result answers
    name: str | None = None
    reasoning_content: str | None = None  # assistant: its reasoning, for templates that render it

    def text(self) -> str:
        return _text(self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


SEED_MAX = 2**63 - 1  # what torch's generators take (with room for one seed per choice)
# Fields that never change an answer: accepted and not used.
NO_EFFECT = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by name (Api.check_fields), never ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's layout) -> -100..100
    stop_token_ids: list[int] | None = None  # vLLM's extra field
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra field; -1 and 0: off
    response_format: dict | None = None  # {type: text | json_object | json_schema, json_schema: {schema, ...}}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # none | auto | required | {type: function, function: {name}}
    parallel_tool_calls: bool = True

    def scoring(self) -> tuple[int | None, bool]:
        """(alternatives per token, or None for no logprobs; echo)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs: true as well", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None, False


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a raw prompt, or messages rendered with the model's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[int]


class CompletionRequest(Sampling):
    # a string, strings, token ids, or lists of token ids (lm-evaluation-harness sends ids); one choice set each
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy endpoint's documented default
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def scoring(self) -> tuple[int | None, bool]:
        return self.logprobs, self.echo


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Prepared:
    """A request made ready off the event loop: its prompts and what decoding and the reply need."""

    prompts: list[list[int]]
    adjust: Adjust | None = None
    plan: object = None  # serve.tools.Plan for chat
    in_reasoning: bool = False  # the prompt left a <think> block open


class Api:
    """What the routes do, as plain methods: they read the engine and its served models, raise ApiError, and need
    no server or HTTP client to test."""

    def __init__(self, engine: Engine, limits: Limits | None = None, api_key: str | None = None,
                 tool_parser: str = "auto"):  # fmt: skip
        self.engine, self.served = engine, engine.served
        self.tool_parser = tool_parser  # --tool-call-parser: auto | none | hermes | llama3_json | mistral
        self.limits = limits or Limits()
        self.api_key = api_key
        self.created = int(time.time())

    def authorize(self, authorization: str) -> None:
        """Check the Authorization header's bearer token (anything passes when the server has no key)."""
        if self.api_key is None:
            return
        if not same_secret(bearer(authorization), self.api_key):
            raise ApiError(401, "invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def health(self) -> dict:
        state = "shutting_down" if self.engine.closing else "ok"
        return {"status": state, "models": self.served.ids, "queued": self.engine.queued, "running": self.engine.busy}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": self.created, "owned_by": "sftlab"}
                                           for m in self.served.ids]}  # fmt: skip

    def check_model(self, model: str) -> None:
        if model not in self.served.adapters:
            raise ApiError(404, f"model {model!r} does not exist; served: {', '.join(self.served.ids)}",
                           code="model_not_found", param="model")  # fmt: skip

    def check_fields(self, body: Sampling) -> None:
        """A field this server would not honour is refused by name: a client must not get an answer that
        silently ignored what it asked for."""
        for name, value in (body.model_extra or {}).items():
            if name not in NO_EFFECT and value is not None:
                raise ApiError(400, f"{name}: not supported by this server; leave it out", param=name)

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        """The conversation rendered with the requested model's chat template, as token ids."""
        return self.prepare_chat(body).prompts[0]

    def template_of(self, model: str) -> str:
        return self.served.templates.get(model) or self.served.tokenizer.chat_template or ""

    def prepare_chat(self, body: ChatRequest) -> Prepared:
        """The rendered prompt, the tool plan (what to render, how to read the reply back) and the sampling
        adjustments, a forced tool call's schema included."""
        from sftlab.serve import tools

        self.check_model(body.model)  # first: the model picks the template
        self.check_fields(body)
        template = self.template_of(body.model)
        try:
            plan = tools.plan(body.tools, body.tool_choice, body.parallel_tool_calls, template, self.tool_parser)
            messages = tools.template_messages(body.messages)
        except tools.ToolError as e:
            raise ApiError(400, str(e), param=e.param) from None
        for i, m in enumerate(messages):
            _check_unicode(m["content"], f"messages.{i}.content")
        try:
            ids = prompt_ids(self.served.tokenizer, messages, self.served.templates.get(body.model), plan.tools)
        except Exception as e:  # a template that rejects this conversation (role order, say)
            raise ApiError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None
        if plan.schema is not None and body.response_format is not None:
            raise ApiError(400, "response_format: not with tool_choice required or a named function (the reply "
                                "is the call)", param="response_format")  # fmt: skip
        forced = {"type": "json_schema", "json_schema": {"schema": plan.schema}} if plan.schema else None
        opened = tools.tp.prompt_opens_reasoning(self.served.tokenizer.decode(ids[-8:], skip_special_tokens=False))
        return Prepared([ids], self.adjustments(body, forced), plan, plan.reasoning and opened)

    def tokenize(self, body: TokenizeRequest) -> dict:
        """Token ids of a prompt or a conversation, as the server would feed them to the model."""
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = self.chat_prompt(ChatRequest(model=body.model, messages=body.messages))
        else:
            self.check_model(body.model)
            _check_unicode(body.prompt, "prompt")
            ids = list(self.served.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        return {"count": len(ids), "max_model_len": self.served.context_length, "tokens": ids, "token_strs": None}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        for t in body.tokens:
            self._token(t, "tokens")
        return {"prompt": self.served.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        """Each prompt as token ids: text is tokenized with the model's special tokens, ids are taken as sent."""
        self.check_model(body.model)
        self.check_fields(body)
        raw = body.prompt
        if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)):
            raw = [raw]
        if not raw:
            raise ApiError(400, "prompt: empty; send the text (or token ids) to continue", param="prompt")
        if len(raw) > self.limits.max_prompts:
            raise ApiError(400, f"prompt: {len(raw)} prompts, above this server's limit of {self.limits.max_prompts}",
                           param="prompt")  # fmt: skip
        return [self._one_prompt(p, f"prompt.{i}" if len(raw) > 1 else "prompt") for i, p in enumerate(raw)]

    def _one_prompt(self, prompt: str | list[int], where: str) -> list[int]:
        tok = self.served.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, f"{where}: empty; send the text to continue", param="prompt")
            _check_unicode(prompt, where)
            return list(tok(prompt, add_special_tokens=True)["input_ids"])
        if not prompt:
            raise ApiError(400, f"{where}: an empty list of token ids", param="prompt")
        return [self._token(t, "prompt", where) for t in prompt]

    def prepare_completion(self, body: CompletionRequest) -> Prepared:
        return Prepared(self.completion_prompts(body), self.adjustments(body))

    def adjustments(self, body: Sampling, response_format: dict | None = None) -> Adjust | None:
        """The request's changes to the distribution, checked (None when it asks for none). Compiling a
        response_format takes milliseconds (a second for a tokenizer's first): call it off the event loop."""
        bias = {self._token(k, "logit_bias"): v for k, v in (body.logit_bias or {}).items()}
        if any(not -100 <= v <= 100 for v in bias.values()):
            raise ApiError(400, "logit_bias: values from -100 to 100", param="logit_bias")
        stop_ids = frozenset(self._token(t, "stop_token_ids") for t in body.stop_token_ids or [])
        constraint = None
        response_format = response_format or body.response_format
        if response_format is not None:
            from sftlab.serve.structured import compile_format

            try:
                constraint = compile_format(response_format, self.served.tokenizer)
            except ValueError as e:
                raise ApiError(400, str(e), param="response_format") from None
        top_k = max(body.top_k or 0, 0)
        if not (bias or stop_ids or constraint or top_k or body.presence_penalty or body.frequency_penalty):
            return None
        return Adjust(bias, body.presence_penalty, body.frequency_penalty, top_k, stop_ids, constraint)

    def _token(self, value, param: str, where: str | None = None) -> int:
        """A token id the model has; `where` names it in the message (default: the field)."""
        where = where or param
        try:
            token = int(value)
        except (TypeError, ValueError):
            raise ApiError(400, f"{where}: {value!r} is not a token id", param=param) from None
        if not 0 <= token < self.served.vocab_size:
            last = self.served.vocab_size - 1
            raise ApiError(400, f"{where}: token id {token} is outside the vocabulary (0..{last})", param=param)
        return token

    def make_request(self, body: Sampling, prompt: list[int]) -> Request:
        """The engine request for `body`, once its sizes fit this server and the model's context.

        Call it inside the event loop that will read the request's events."""
        return self.make_requests(body, [prompt])[0]

    def make_requests(self, body: Sampling, prompts: list[list[int]], adjust: Adjust | None = None,
                      keep_special: bool = False) -> list[Request]:  # fmt: skip
        """One engine request per prompt, sharing one event queue; choice k*n+j is prompt k's j-th."""
        asked = self._asked_tokens(body)
        self._check_n(body.n * len(prompts))
        n = body.n
        stop = _stop_strings(body.stop, self.limits)
        budgets = [self._fit_context(asked, len(p)) for p in prompts]
        logprobs, echo = body.scoring() if hasattr(body, "scoring") else (None, False)
        events, loop = asyncio.Queue(), asyncio.get_running_loop()
        return [Request(p, body.model, budget, body.temperature, body.top_p, n, stop, body.seed, events, loop,
                        first_choice=k * n, logprobs=logprobs, echo=echo, adjust=adjust, keep_special=keep_special)
                for k, (p, budget) in enumerate(zip(prompts, budgets))]  # fmt: skip

    def _asked_tokens(self, body: Sampling) -> int | None:
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {self.limits.max_tokens}",
                           param="max_tokens")  # fmt: skip
        return asked

    def _check_n(self, n: int) -> int:
        most = min(self.limits.max_n, self.engine.max_batch)  # each choice is a row of one running batch
        if n > most:
            raise ApiError(400, f"n {n} (choices of all prompts) is above this server's limit of {most}", param="n")
        return n

    def _fit_context(self, asked: int | None, prompt_len: int) -> int:
        """The tokens to generate (`asked`, or the default when None) if they fit the context after the prompt."""
        context = self.served.context_length
        room = context - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens, more than the model's context of {context}; "
                                "shorten it", code="context_length_exceeded", param="messages")  # fmt: skip
        max_tokens = asked or min(self.limits.default_max_tokens, room)
        if max_tokens > room:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; with max_tokens {max_tokens} that is more than "
                                f"the model's context of {context} tokens; shorten the prompt or lower max_tokens",
                           code="context_length_exceeded", param="max_tokens")  # fmt: skip
        return max_tokens

    def submit(self, request: Request) -> None:
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", "server_error", "server_overloaded") from None
        except Closing as e:
            raise ApiError(503, str(e), "server_error", "shutting_down") from None

    def start(self, body: Sampling, prompts: list[list[int]], chat: bool, adjust: Adjust | None = None,
              keep_special: bool = False) -> tuple[list[Request], str]:  # fmt: skip
        """Check and queue the requests (one per prompt); the id their response carries."""
        group = self.make_requests(body, prompts, adjust, keep_special)
        try:
            for request in group:
                self.submit(request)
        except ApiError:
            for request in group:
                request.cancelled = True  # the ones already queued are skipped by the engine
            raise
        return group, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _stop_strings(stop: str | list[str] | None, limits: Limits) -> list[str]:
    """The non-empty stop strings (an empty one would end every answer before it starts), bounded."""
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"stop: at most {limits.max_stop} sequences", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise ApiError(400, f"stop: each sequence at most {limits.max_stop_chars} characters", param="stop")
    return stop


def _check_unicode(text: str, where: str) -> None:
    """Lone surrogates (JSON allows \\ud800) cannot be tokenized: a 400 naming the field, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where}: not valid Unicode ({e.reason} at character {e.start})", param=where) from None


def _choices(group: list[Request]) -> int:
    return sum(r.n for r in group)


async def complete(group: list[Request], rid: str, chat: bool, is_disconnected, poll_s: float = 0.5,
                   tokenizer=None, prepared: Prepared | None = None) -> dict:  # fmt: skip
    """The whole response once every choice is done; {} when the client left first.

    `group`: the requests of one response (one per prompt), sharing an event queue. `is_disconnected` is an
    async callable (the HTTP request's); it is asked every `poll_s` without events, so a client that gave
    up stops costing batch rows."""
    events, total = group[0].events, _choices(group)
    texts, reasons, tokens = [""] * total, [None] * total, [0] * total
    scored = [[] for _ in range(total)]
    try:
        while any(r is None for r in reasons):
            try:
                event = await asyncio.wait_for(events.get(), timeout=poll_s)
            except TimeoutError:
                if await is_disconnected():
                    return {}
                continue
            if event[0] == "error":
                raise ApiError(503 if "shut down" in event[1] else 500, event[1], "server_error")
            if event[0] == "delta":
                texts[event[1]] += event[2]
                scored[event[1]] += event[3] or []
            else:
                reasons[event[1]], tokens[event[1]] = event[2], event[3]
    finally:
        for request in group:
            request.cancelled = True  # a no-op when finished; frees the rows when the client left
    wanted = group[0].logprobs is not None
    logprobs = [logprobs_body(tokenizer, chat, s) if wanted else None for s in scored]
    messages = None
    if chat and prepared is not None and prepared.plan is not None:
        from sftlab.serve.tools import reply

        messages, reasons = zip(*(reply(prepared.plan, t, r, prepared.in_reasoning) for t, r in zip(texts, reasons)))
    return completion_body(group, rid, chat, texts, list(reasons), tokens, logprobs, messages)


def completion_body(group: list[Request], rid: str, chat: bool, texts: list[str], reasons: list[str],
                    tokens: list[int], logprobs: list | None = None, messages=None) -> dict:  # fmt: skip
    logprobs = logprobs or [None] * len(texts)
    messages = messages or [{"role": "assistant", "content": t} for t in texts]
    choices = [
        {"index": i, "message": m, "finish_reason": r, "logprobs": lp} if chat
        else {"index": i, "text": t, "finish_reason": r, "logprobs": lp}
        for i, (t, m, r, lp) in enumerate(zip(texts, messages, reasons, logprobs))
    ]  # fmt: skip
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": group[0].model, "choices": choices, "usage": usage(group, tokens)}  # fmt: skip


async def stream(group: list[Request], rid: str, chat: bool, body: Sampling, tokenizer=None,
                 prepared: Prepared | None = None):  # fmt: skip
    """Server-sent events: (chat) a role chunk per choice, the deltas, a finish chunk per choice, the usage when
    asked, then [DONE]. An engine error ends the stream with an error event."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": group[0].model}  # fmt: skip
    total = _choices(group)
    tokens, open_choices, offsets = [0] * total, total, [0] * total
    streamers = None
    if chat and prepared is not None and prepared.plan is not None:
        from sftlab.serve.tools import Streamer

        streamers = [Streamer(prepared.plan, prepared.in_reasoning) for _ in range(total)]
    try:
        if chat:
            for i in range(total):
                yield chunk(head, chat, i, role=True)
        while open_choices:
            event = await group[0].events.get()
            if event[0] == "error":
                yield _sse(ApiError(500, event[1], "server_error").body())
                break
            if event[0] == "delta":
                lp = None
                if event[3] is not None:
                    lp = logprobs_body(tokenizer, chat, event[3], offsets[event[1]])
                    offsets[event[1]] += sum(map(len, lp.get("tokens", ())))
                if streamers is None:
                    yield chunk(head, chat, event[1], event[2], logprobs=lp)
                    continue
                deltas = streamers[event[1]].feed(event[2]) or ([{}] if lp else [])
                for j, delta in enumerate(deltas):
                    yield chunk(head, chat, event[1], delta=delta, logprobs=lp if j == 0 else None)
            else:
                tokens[event[1]] = event[3]
                open_choices -= 1
                reason = event[2]
                if streamers is not None:
                    deltas, reason = streamers[event[1]].finish(reason)
                    for delta in deltas:
                        yield chunk(head, chat, event[1], delta=delta)
                yield chunk(head, chat, event[1], reason=reason)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": usage(group, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        for request in group:
            request.cancelled = True  # the client disconnected (or we finished): free its rows


def chunk(head: dict, chat: bool, index: int, content: str | None = None, reason: str | None = None,
          role: bool = False, logprobs: dict | None = None, delta: dict | None = None) -> str:  # fmt: skip
    """One streamed event for choice `index`; `head` holds the id, object, created and model every chunk repeats.
    `delta`: a chat delta as it is (reasoning_content, tool_calls) instead of `content`."""
    if chat:
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": content or "", "finish_reason": reason, "logprobs": logprobs}
    return _sse({**head, "choices": [choice]}, ensure_ascii=False)


def _sse(payload: dict, ensure_ascii: bool = True) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=ensure_ascii)}\n\n"


def logprobs_body(tokenizer, chat: bool, scored: list[tuple], start: int = 0) -> dict:
    """OpenAI's logprobs for (token, logprob, alternatives) records: chat's {"content": [...]} or the
    completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset; the echoed prompt's
    first token has no logprob, as OpenAI's)."""
    def piece(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    def entry(t: int, lp: float) -> dict:
        return {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode("utf-8"))}

    if chat:
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top or []]}
                            for t, lp, top in scored]}  # fmt: skip
    tokens = [piece(t) for t, _, _ in scored]
    offsets = [start + o for o in itertools.accumulate(map(len, tokens), initial=0)][:-1]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in scored],
            "top_logprobs": [None if top is None else {piece(a): alp for a, alp in top} for _, _, top in scored],
            "text_offset": offsets}  # fmt: skip


def usage(group: list[Request] | Request, tokens: list[int]) -> dict:
    group = group if isinstance(group, list) else [group]
    prompt = sum(len(r.prompt_ids) for r in group)  # once per prompt, whatever n (as OpenAI counts)
    return {"prompt_tokens": prompt, "completion_tokens": sum(tokens), "total_tokens": prompt + sum(tokens)}


def schema_error(errors: list[dict]) -> ApiError:
    """A request that does not fit the schema, named by its first problem (loc[0] is "body")."""
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
    return ApiError(422, message, code="invalid_schema", param=where)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    other = next((part.type for part in content if part.type != "text"), None)
    if other is not None:  # an image, audio or file part: a text model cannot read it, and dropping it is wrong
        raise ApiError(400, f"messages: content parts of type {other!r} are not supported (text only)",
                       param="messages")  # fmt: skip
    return "".join(part.text for part in content)


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None, grace_s: float = 10.0,
               docs: bool = False, tool_parser: str = "auto"):  # fmt: skip
    """The FastAPI app: routes, error bodies and auth around an Api; on exit the engine finishes for up to grace_s.
    docs: serve /docs and /openapi.json (behind the key, when there is one)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    api = Api(engine, limits, api_key, tool_parser)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, grace_s)

    app = FastAPI(title="sftlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_schema(_, exc: RequestValidationError):
        return await api_error(_, schema_error(exc.errors()))

    @app.exception_handler(HTTPException)  # an unparseable body (bad UTF-8, nesting), an unknown route or method
    async def http_error(_, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return await api_error(_, ApiError(exc.status_code, f"{exc.detail}", code=code))

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return await api_error(_, ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def authorize(request: HttpRequest) -> None:
        api.authorize(request.headers.get("authorization", ""))

    async def respond(body: Sampling, prepare, http: HttpRequest, chat: bool):
        # Rendering, tokenizing and compiling a response format take milliseconds: off the event loop, so
        # streams beside them keep flowing.
        ready: Prepared = await asyncio.to_thread(prepare, body)
        keep = ready.plan is not None and ready.plan.keep_special
        group, rid = api.start(body, ready.prompts, chat, ready.adjust, keep)
        if body.stream:
            return StreamingResponse(stream(group, rid, chat, body, api.served.tokenizer, ready),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)  # fmt: skip
        return await complete(group, rid, chat, http.is_disconnected, tokenizer=api.served.tokenizer, prepared=ready)

    if docs:
        _add_docs(app, authorize)

    @app.get("/health")
    async def health():
        return api.health()

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return api.models()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, http: HttpRequest):
        return await respond(body, api.prepare_chat, http, chat=True)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest):
        return await asyncio.to_thread(api.tokenize, body)

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest):
        return await asyncio.to_thread(api.detokenize, body)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await respond(body, api.prepare_completion, http, chat=False)

    return app


def _add_docs(app, authorize) -> None:
    from fastapi import Depends
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import JSONResponse

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    async def openapi():
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorize)])
    async def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sftlab")
