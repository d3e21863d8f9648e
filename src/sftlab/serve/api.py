"""OpenAI-compatible HTTP API over the engine: chat completions, completions, models, health.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}; one bad
request never takes the server down. create_app only wires FastAPI; what each route does is in Api and
the functions below it, which need no server or HTTP client to test.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Request as HttpRequest  # at module level: FastAPI resolves string annotations here
from pydantic import BaseModel, Field

from sftlab.auth import bearer, same_secret
from sftlab.generate import prompt_ids
from sftlab.serve.engine import Closing, Engine, QueueFull, Request


@dataclass
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_n: int = 8


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
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # the legacy endpoint's documented default


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Api:
    """What the routes do, as plain methods: they read the engine and its served models, raise ApiError, and need
    no server or HTTP client to test."""

    def __init__(self, engine: Engine, limits: Limits | None = None, api_key: str | None = None):
        self.engine, self.served = engine, engine.served
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

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        """The conversation rendered with the requested model's chat template, as token ids."""
        self.check_model(body.model)  # first: the model picks the template
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]  # fmt: skip
        try:
            return prompt_ids(self.served.tokenizer, messages, self.served.templates.get(body.model))
        except Exception as e:  # a template that rejects this conversation (role order, say)
            raise ApiError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        self.check_model(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        return list(self.served.tokenizer(prompts[0], add_special_tokens=True)["input_ids"])

    def make_request(self, body: Sampling, prompt: list[int]) -> Request:
        """The engine request for `body`, once its sizes fit this server and the model's context.

        Call it inside the event loop that will read the request's events."""
        asked = self._asked_tokens(body)
        n = self._check_n(body.n)
        max_tokens = self._fit_context(asked, len(prompt))
        stop = _stop_strings(body.stop)
        return Request(prompt, body.model, max_tokens, body.temperature, body.top_p, n, stop, body.seed,
                       asyncio.Queue(), asyncio.get_running_loop())  # fmt: skip

    def _asked_tokens(self, body: Sampling) -> int | None:
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {self.limits.max_tokens}",
                           param="max_tokens")  # fmt: skip
        return asked

    def _check_n(self, n: int) -> int:
        most = min(self.limits.max_n, self.engine.max_batch)  # each choice is a row of one running batch
        if n > most:
            raise ApiError(400, f"n {n} is above this server's limit of {most}", param="n")
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

    def start(self, body: Sampling, prompt: list[int], chat: bool) -> tuple[Request, str]:
        """Check and queue the request; the id its response carries."""
        request = self.make_request(body, prompt)
        self.submit(request)
        return request, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
    if len(stop) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    return stop


async def complete(request: Request, rid: str, chat: bool, is_disconnected, poll_s: float = 0.5) -> dict:
    """The whole response once every choice is done; {} when the client left first.

    `is_disconnected` is an async callable (the HTTP request's); it is asked every `poll_s` without events, so a
    client that gave up stops costing batch rows."""
    texts, reasons, tokens = [""] * request.n, [None] * request.n, [0] * request.n
    try:
        while any(r is None for r in reasons):
            try:
                event = await asyncio.wait_for(request.events.get(), timeout=poll_s)
            except TimeoutError:
                if await is_disconnected():
                    return {}
                continue
            if event[0] == "error":
                raise ApiError(503 if "shut down" in event[1] else 500, event[1], "server_error")
            if event[0] == "delta":
                texts[event[1]] += event[2]
            else:
                reasons[event[1]], tokens[event[1]] = event[2], event[3]
    finally:
        request.cancelled = True  # a no-op when finished; frees the rows when the client left
    return completion_body(request, rid, chat, texts, reasons, tokens)


def completion_body(request: Request, rid: str, chat: bool, texts: list[str], reasons: list[str],
                    tokens: list[int]) -> dict:  # fmt: skip
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None} if chat
        else {"index": i, "text": t, "finish_reason": r, "logprobs": None}
        for i, (t, r) in enumerate(zip(texts, reasons))
    ]  # fmt: skip
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": request.model, "choices": choices, "usage": usage(request, tokens)}  # fmt: skip


async def stream(request: Request, rid: str, chat: bool, body: Sampling):
    """Server-sent events: (chat) a role chunk per choice, the deltas, a finish chunk per choice, the usage when
    asked, then [DONE]. An engine error ends the stream with an error event."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": request.model}  # fmt: skip
    tokens, open_choices = [0] * request.n, request.n
    try:
        if chat:
            for i in range(request.n):
                yield chunk(head, chat, i, role=True)
        while open_choices:
            event = await request.events.get()
            if event[0] == "error":
                yield _sse(ApiError(500, event[1], "server_error").body())
                break
            if event[0] == "delta":
                yield chunk(head, chat, event[1], event[2])
            else:
                tokens[event[1]] = event[3]
                open_choices -= 1
                yield chunk(head, chat, event[1], reason=event[2])
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "choices": [], "usage": usage(request, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        request.cancelled = True  # the client disconnected (or we finished): free its rows


def chunk(head: dict, chat: bool, index: int, content: str | None = None, reason: str | None = None,
          role: bool = False) -> str:  # fmt: skip
    """One streamed event for choice `index`; `head` holds the id, object, created and model every chunk repeats."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": index, "text": content or "", "finish_reason": reason, "logprobs": None}
    return _sse({**head, "choices": [choice]}, ensure_ascii=False)


def _sse(payload: dict, ensure_ascii: bool = True) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=ensure_ascii)}\n\n"


def usage(request: Request, tokens: list[int]) -> dict:
    prompt = len(request.prompt_ids)
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
    return "".join(part.text for part in content if part.type == "text")


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None, grace_s: float = 10.0):
    """The FastAPI app: routes, error bodies and auth around an Api; on exit the engine finishes for up to grace_s."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    api = Api(engine, limits, api_key)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, grace_s)

    app = FastAPI(title="sftlab", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_schema(_, exc: RequestValidationError):
        return await api_error(_, schema_error(exc.errors()))

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return await api_error(_, ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    async def authorize(request: HttpRequest) -> None:
        api.authorize(request.headers.get("authorization", ""))

    async def respond(body: Sampling, prompt: list[int], http: HttpRequest, chat: bool):
        request, rid = api.start(body, prompt, chat)
        if body.stream:
            return StreamingResponse(stream(request, rid, chat, body), media_type="text/event-stream",
                                     headers=_SSE_HEADERS)  # fmt: skip
        return await complete(request, rid, chat, http.is_disconnected)

    @app.get("/health")
    async def health():
        return api.health()

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return api.models()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, http: HttpRequest):
        return await respond(body, api.chat_prompt(body), http, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await respond(body, api.completion_prompt(body), http, chat=False)

    return app
