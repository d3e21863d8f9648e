"""`sftlab serve` against bad and hostile requests, on loopback, through the edge `sftlab serve` runs
(sftlab.serve.guard): each bad request gets an OpenAI-shaped error, and streams decoding beside them finish."""

import asyncio
import json
import socket
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def edge(lively_model_dir):
    """A keyless loopback server with small limits: 64 KiB bodies, 1 s for headers."""
    from helpers import live_server

    from sftlab.serve import guard
    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    served = load_served(str(lively_model_dir))
    served.context_length = 8192  # rotary positions extrapolate: streams long enough to outlast the probe
    engine = Engine(served, max_batch=8)
    limits = guard.HttpLimits(max_body_bytes=64 * 1024, max_connections=64, header_timeout_s=1.0)
    app = guard.guarded(create_app(engine, Limits(max_tokens=4000), None, grace_s=2), limits, loopback_keyless=True)
    url, stop = live_server(app, limits)
    yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "model": engine.served.ids[0]}
    stop()


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_bodies_past_the_limit_are_413_declared_or_chunked(edge):
    big = json.dumps({"model": edge["model"], "prompt": "x" * 70_000}).encode()
    with httpx.Client(base_url=edge["url"], timeout=30) as http:
        assert _openai_error(http.post("/v1/completions", content=big), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: Transfer-Encoding: chunked
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        assert _openai_error(http.post("/v1/completions", content=chunks()), 413)["code"] == "request_too_large"
        assert http.get("/health").status_code == 200


def test_a_keyless_loopback_server_answers_only_to_loopback_names(edge):
    with httpx.Client(base_url=edge["url"], timeout=30) as http:
        assert _openai_error(http.get("/health", headers={"Host": "evil.example:80"}), 400)["code"] == "invalid_host"
        for host in ("127.0.0.1", "localhost", f"localhost:{edge['port']}", "[::1]"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host


def test_docs_are_off_unless_asked_and_unparseable_bodies_get_openai_errors(edge):
    with httpx.Client(base_url=edge["url"], timeout=30) as http:
        for path in ("/docs", "/openapi.json", "/redoc"):
            _openai_error(http.get(path), 404)
        headers = {"content-type": "application/json"}
        _openai_error(http.post("/v1/completions", content=b'{"model": "\xff\xfe"}', headers=headers), 400)
        nested = b"[" * 20_000 + b"]" * 20_000  # within the body limit, past json's recursion limit
        assert _openai_error(http.post("/v1/completions", content=nested, headers=headers), 400)


def test_half_sent_requests_are_closed_after_the_header_timeout(edge):
    sockets = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", edge["port"]))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
        sockets.append(s)
    time.sleep(2.5)
    closed = 0
    for s in sockets:
        s.settimeout(2)
        try:
            closed += s.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            closed += 0
        s.close()
    assert closed == 30
    assert httpx.get(edge["url"] + "/health", timeout=10).status_code == 200


BAD_REQUESTS = [  # (endpoint, body, status, param): each from the list of requests that hurt others
    ("/v1/chat/completions", {"seed": 2**64, "temperature": 1.0}, 422, "seed"),
    ("/v1/chat/completions", {"seed": -1, "temperature": 1.0}, 422, "seed"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "\ud800 lone"}, 400, "prompt"),
    ("/v1/chat/completions", {"stop": ["x" * 40_000]}, 400, "stop"),
    ("/v1/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"999999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/chat/completions", {"n": 10**6}, 422, "n"),
    ("/v1/chat/completions", {"max_tokens": 10**9}, 400, "max_tokens"),
]


def test_bad_requests_beside_running_streams_fail_alone(edge):
    """Four streams decode while every bad request is sent twice; each stream ends with [DONE],
    each bad request gets its own error, and the server answers afterwards."""
    model = edge["model"]
    chat = {"model": model, "messages": [{"role": "user", "content": "tell me about rivers"}]}

    async def a_stream(http):
        body = {**chat, "stream": True, "max_tokens": 400, "temperature": 0, "stop": ""}
        text, done = "", False
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    text += event["choices"][0]["delta"].get("content") or ""
        ended.append(time.monotonic())
        return done, text

    async def a_bad(http, endpoint, extra, status, param):
        body = {**({"model": model, "prompt": "hi"} if endpoint == "/v1/completions" else chat), **extra}
        r = await http.post(endpoint, content=json.dumps(body), headers={"content-type": "application/json"})
        error = _openai_error(r, status)
        assert error["param"] == param or (error["param"] or "").startswith(param), (extra, error)

    async def raw_bad(http):
        """The bad inputs that are not a JSON field: unparseable bodies, a foreign Host, the docs, a body
        past the limit, and connections that never finish their headers."""
        json_type = {"content-type": "application/json"}
        _openai_error(await http.post("/v1/completions", content=b'{"model": "\xff"}', headers=json_type), 400)
        _openai_error(await http.post("/v1/completions", content=b"[" * 20_000 + b"]" * 20_000, headers=json_type),
                      400)  # fmt: skip
        _openai_error(await http.get("/health", headers={"Host": "rebind.example"}), 400)
        _openai_error(await http.get("/docs"), 404)
        _openai_error(await http.post("/v1/completions", content=b"x" * 70_000, headers=json_type), 413)
        half = []
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge["port"])
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            half.append((reader, writer))
        for reader, writer in half:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at the header timeout
            writer.close()

    ended = []

    async def go():
        async with httpx.AsyncClient(base_url=edge["url"], timeout=120) as http:
            streams = [asyncio.create_task(a_stream(http)) for _ in range(4)]
            await asyncio.sleep(0.3)
            probing = time.monotonic()
            assert not any(t.done() for t in streams)
            for _ in range(2):
                await asyncio.gather(raw_bad(http), *(a_bad(http, *bad) for bad in BAD_REQUESTS))
            results = await asyncio.gather(*streams)
            assert min(ended) > probing  # every stream was decoding when the bad requests began
            after = await http.post("/v1/chat/completions", json={**chat, "max_tokens": 4, "temperature": 0})
            return results, after

    results, after = asyncio.run(asyncio.wait_for(go(), 120))
    assert all(done for done, _ in results)
    assert len({text for _, text in results}) == 1 and results[0][1]  # greedy: the same, non-empty answer
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"]


def test_incremental_detokenization_and_stops_match_a_whole_decode(smol_tok):
    """Rows fed token by token emit exactly the text a whole decode gives, up to the first stop string,
    multi-byte characters split across tokens included."""
    from sftlab.serve.engine import Request, _Row

    class Sink:
        def __init__(self):
            self.events = []

        def put_nowait(self, e):
            self.events.append(e)

    class Loop:
        def call_soon_threadsafe(self, fn, *a):
            fn(*a)

    texts = ["Rivers flow 東京 to the sea 🌊 and back, said Zoë.", "a b c STOP d", "x" * 40 + "END" + "y" * 10,
             "word 東 " * 1200 + "ST" + "OP tail END"]  # past the 4096 characters a row keeps of sent text
    for text in texts:
        ids = smol_tok(text, add_special_tokens=False)["input_ids"]
        for stop in ([], ["STOP"], ["END", "sea"], ["🌊"]):
            sink = Sink()
            row = _Row(Request([1], "m", 10_000, temperature=0, stop=stop, events=sink, loop=Loop()), 0)
            stopped = False
            for token in ids:
                row.ids.append(token)
                delta, stopped = row.text_delta(smol_tok)
                if delta:
                    row.request.emit("delta", 0, delta)
                if stopped:
                    row.finish("stop_string", smol_tok)
                    break
            if not stopped:
                row.finish("length", smol_tok)
            got = "".join(e[2] for e in sink.events if e[0] == "delta")
            whole = smol_tok.decode(ids, skip_special_tokens=True)
            cut = min([whole.find(s) for s in stop if s in whole], default=len(whole))
            assert got == whole[:cut], (text, stop, got)


def test_docs_when_asked_for_are_behind_the_key(lively_model_dir):
    from fastapi.testclient import TestClient

    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import create_app
    from sftlab.serve.engine import Engine

    engine = Engine(load_served(str(lively_model_dir)))
    try:
        with TestClient(create_app(engine, api_key="k3y", docs=True)) as http:
            for path in ("/docs", "/openapi.json"):
                assert http.get(path).status_code == 401
                assert http.get(path, headers={"Authorization": "Bearer k3y"}).status_code == 200
            assert "/v1/chat/completions" in http.get("/openapi.json", headers={"Authorization": "Bearer k3y"}).json()[
                "paths"]  # fmt: skip
    finally:
        engine.shutdown(2)
