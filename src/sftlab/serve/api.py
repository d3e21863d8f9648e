"""OpenAI-compatible HTTP API over the engine: chat completions, completions, models, health.

Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}; one bad
request never takes the server down.
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


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None, grace_s: float = 10.0):
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    limits = limits or Limits()
    served = engine.served
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.shutdown, grace_s)

    app = FastAPI(title="sftlab", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def schema_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        err = ApiError(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code="invalid_schema", param=where)
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    async def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        if not same_secret(bearer(request.headers.get("authorization", "")), api_key):
            raise ApiError(401, "invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        state = "shutting_down" if engine.closing else "ok"
        return {"status": state, "models": served.ids, "queued": engine.queued, "running": engine.busy}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "sftlab"}
                                           for m in served.ids]}  # fmt: skip

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, http: HttpRequest):
        _check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]  # fmt: skip
        template = served.templates.get(body.model)
        try:
            prompt = prompt_ids(served.tokenizer, messages, template)
        except Exception as e:  # a template that rejects this conversation (role order, say)
            raise ApiError(400, f"messages: the chat template cannot render them: {e}", param="messages") from None
        return await _respond(body, prompt, http, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_model(body.model)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        ids = served.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        return await _respond(body, list(ids), http, chat=False)

    def _check_model(model: str) -> None:
        if model not in served.adapters:
            raise ApiError(404, f"model {model!r} does not exist; served: {', '.join(served.ids)}",
                           code="model_not_found", param="model")  # fmt: skip

    def _request(body: Sampling, prompt: list[int]) -> Request:
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")  # fmt: skip
        if body.n > limits.max_n or body.n > engine.max_batch:
            raise ApiError(400, f"n {body.n} is above this server's limit of {min(limits.max_n, engine.max_batch)}",
                           param="n")  # fmt: skip
        room = served.context_length - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens, more than the model's context of "
                                f"{served.context_length}; shorten it", code="context_length_exceeded", param="messages")  # fmt: skip
        max_tokens = asked or min(limits.default_max_tokens, room)
        if max_tokens > room:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; with max_tokens {max_tokens} that is more than "
                                f"the model's context of {served.context_length} tokens; shorten the prompt or lower "
                                "max_tokens", code="context_length_exceeded", param="max_tokens")  # fmt: skip
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        if len(stop) > 4:
            raise ApiError(400, "stop: at most 4 sequences", param="stop")
        return Request(prompt, body.model, max_tokens, body.temperature, body.top_p, body.n, stop, body.seed,
                       asyncio.Queue(), asyncio.get_running_loop())  # fmt: skip

    async def _respond(body: Sampling, prompt: list[int], http: HttpRequest, chat: bool):
        request = _request(body, prompt)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", "server_error", "server_overloaded") from None
        except Closing as e:
            raise ApiError(503, str(e), "server_error", "shutting_down") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_stream(request, rid, chat, body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        return await _complete(request, rid, chat, http)

    async def _complete(request: Request, rid: str, chat: bool, http: HttpRequest) -> dict:
        texts, reasons, tokens = [""] * request.n, [None] * request.n, [0] * request.n
        try:
            while any(r is None for r in reasons):
                try:
                    event = await asyncio.wait_for(request.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
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
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None} if chat
            else {"index": i, "text": t, "finish_reason": r, "logprobs": None}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]  # fmt: skip
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": request.model, "choices": choices, "usage": _usage(request, tokens)}  # fmt: skip

    async def _stream(request: Request, rid: str, chat: bool, body: Sampling):
        kind = "chat.completion.chunk" if chat else "text_completion"
        now = int(time.time())

        def chunk(index: int, content: str | None = None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": index, "text": content or "", "finish_reason": reason, "logprobs": None}
            payload = {"id": rid, "object": kind, "created": now, "model": request.model, "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        tokens, open_choices = [0] * request.n, request.n
        try:
            if chat:
                for i in range(request.n):
                    yield chunk(i, role=True)
            while open_choices:
                event = await request.events.get()
                if event[0] == "error":
                    yield f"data: {json.dumps(ApiError(500, event[1], 'server_error').body())}\n\n"
                    break
                if event[0] == "delta":
                    yield chunk(event[1], event[2])
                else:
                    tokens[event[1]] = event[3]
                    open_choices -= 1
                    yield chunk(event[1], reason=event[2])
            if body.stream_options and body.stream_options.include_usage:
                usage = {"id": rid, "object": kind, "created": now, "model": request.model, "choices": [],
                         "usage": _usage(request, tokens)}  # fmt: skip
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            request.cancelled = True  # the client disconnected (or we finished): free its rows

    return app


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if part.type == "text")


def _usage(request: Request, tokens: list[int]) -> dict:
    prompt = len(request.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": sum(tokens), "total_tokens": prompt + sum(tokens)}
