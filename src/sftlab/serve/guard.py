"""The HTTP edge of `sftlab serve`: what uvicorn and FastAPI leave open, closed before a request reaches the API.

    BodyLimit        a request body larger than max_body_bytes is refused with 413, whether its size is
                     declared (Content-Length) or it arrives chunked; nothing beyond the limit is buffered
    LoopbackOnly     a keyless server bound to loopback answers only to loopback Host names (DNS rebinding)
    GuardedH11       a connection that has not finished its request headers within header_timeout_s is closed
                     (uvicorn times out idle keep-alive connections only, so half-sent requests pile up)
    run()            uvicorn with those, a connection limit and keep-alive/header timeouts
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from sftlab.auth import is_loopback_host


@dataclass
class HttpLimits:
    max_body_bytes: int = 4 * 2**20
    max_connections: int = 256  # uvicorn answers 503 past this many open connections and tasks
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_header_bytes: int = 64 * 1024  # h11's limit on an incomplete request line + headers


async def _refuse(send, status: int, message: str, code: str) -> None:
    from sftlab.serve.api import ApiError

    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: read the body up to the limit, then hand it on whole; refuse it past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        return await self.app(scope, replay, send)

    async def _too_large(self, send):
        await _refuse(send, 413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                                 "(--max-body-bytes)", "request_too_large")  # fmt: skip


class LoopbackOnly:
    """ASGI middleware for a keyless loopback server: a request naming another host is refused."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback_host(name):
                return await _refuse(send, 400, "this server answers only to localhost/127.0.0.1 (Host header); "
                                                "set --api-key to serve other names", "invalid_host")  # fmt: skip
        return await self.app(scope, receive, send)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_deadline = None
        self._arm()

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # between requests: a new one is starting
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        # Also called when a response completes (a pipelined or early-sent next request is parsed then).
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers are in
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded(app, limits: HttpLimits, loopback_keyless: bool):
    """The app behind the body limit (and the Host check for a keyless loopback server)."""
    app = BodyLimit(app, limits.max_body_bytes)
    return LoopbackOnly(app) if loopback_keyless else app


def config(app, host: str, port: int, limits: HttpLimits, grace_s: float, log_level: str = "warning"):
    """The uvicorn.Config `sftlab serve` runs (tests start a Server from it on a free port)."""
    import uvicorn

    protocol = type("Guarded", (GuardedH11,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=limits.max_connections,
                          timeout_keep_alive=limits.keep_alive_s, h11_max_incomplete_event_size=limits.max_header_bytes,
                          timeout_graceful_shutdown=grace_s, log_level=log_level)  # fmt: skip


def run(app, host: str, port: int, limits: HttpLimits, grace_s: float) -> None:
    import uvicorn

    uvicorn.Server(config(app, host, port, limits, grace_s)).run()
