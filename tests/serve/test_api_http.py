"""The OpenAI-compatible server on loopback, talked to by the official `openai` client and plain HTTP."""

import asyncio
import json
import time

import httpx
import pytest

from sftlab.cli import main

KEY = "test-key-123"


def _adapter(base_dir, out, seed):
    """A LoRA adapter with random (non-zero) weights, saved like a run: adapter + tokenizer with template."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory, lively_model_dir):
    from helpers import live_server

    from sftlab.serve.adapters import load_served
    from sftlab.serve.api import Limits, create_app
    from sftlab.serve.engine import Engine

    tmp = tmp_path_factory.mktemp("serve")
    alpha = _adapter(lively_model_dir, tmp / "alpha", 1)
    beta = _adapter(lively_model_dir, tmp / "beta", 2)
    served = load_served(str(alpha), [f"beta={beta}"])
    served.context_length = 8192  # rotary positions extrapolate; long enough that a 6000-token stream takes seconds
    engine = Engine(served, max_batch=16, max_queue=128)
    url, stop = live_server(create_app(engine, Limits(max_tokens=6000), api_key=KEY, grace_s=5))
    yield {"url": url, "engine": engine, "base": lively_model_dir.name}
    stop()


@pytest.fixture
def client(live):
    from openai import OpenAI

    return OpenAI(base_url=live["url"] + "/v1", api_key=KEY, max_retries=0)


def _chat(client, model, text="hello there", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 12), **kw)  # fmt: skip


def test_models_chat_stream_and_completions_with_the_openai_client(client, live):
    assert sorted(m.id for m in client.models.list()) == sorted([live["base"], "alpha", "beta"])
    full = _chat(client, "alpha")
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    usage = full.usage
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert full.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello there"}],
                                            temperature=0, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # streamed greedy == non-streamed greedy
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    done = client.completions.create(model="alpha", prompt="river stone", max_tokens=6, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 6 and done.choices[0].text


def test_the_request_model_selects_the_adapter(client, live):
    answers = {m: _chat(client, m, max_tokens=16).choices[0].message.content for m in ("alpha", "beta", live["base"])}
    assert len(set(answers.values())) == 3, answers
    assert _chat(client, "alpha", max_tokens=16).choices[0].message.content == answers["alpha"]  # deterministic


def test_n_seed_and_stop(client):
    kw = dict(model="beta", messages=[{"role": "user", "content": "tell"}], max_tokens=20, temperature=1.0, n=3)
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    assert len(a.choices) == 3 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    full = _chat(client, "alpha", max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = _chat(client, "alpha", max_tokens=20, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def test_errors_are_openai_shaped(client, live):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _chat(client, "gpt-4")
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, "alpha", text="river " * 8200)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        _chat(client, "alpha", max_tokens=7000)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(live["url"] + "/v1/chat/completions", json={"model": "alpha"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = httpx.post(live["url"] + "/v1/chat/completions", json={"model": "alpha", "messages": [], "temperature": 9},
                   headers=headers)  # fmt: skip
    assert r.status_code == 422 and "error" in r.json()
    live["engine"].max_queue = 0  # the queue is full
    try:
        with pytest.raises(openai.InternalServerError) as err:
            _chat(client, "alpha")
        assert err.value.status_code == 503
    finally:
        live["engine"].max_queue = 128
    assert httpx.get(live["url"] + "/health").json()["status"] == "ok"
    assert _chat(client, "alpha").choices[0].message.content is not None  # still serving after all that


def test_64_concurrent_streams_all_complete_as_well_formed_sse(live):
    async def one(http, i):
        body = {"model": ["alpha", "beta"][i % 2], "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 16, "temperature": 0.7, "seed": i, "stream": True}  # fmt: skip
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            lines = [line async for line in r.aiter_lines() if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        return r.status_code

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live["url"], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120, limits=limits) as http:  # fmt: skip
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    assert asyncio.run(run()) == [200] * 64


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live):
    engine = live["engine"]
    dropped = engine.dropped_rows
    body = {"model": "alpha", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 6000, "stream": True}
    with httpx.stream("POST", live["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": ""' not in line:
                break  # generated text is streaming: hang up
        started = time.time()
    deadline = time.time() + 20
    while (engine.busy or engine.dropped_rows == dropped) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.dropped_rows > dropped and engine.busy == 0
    assert time.time() - started < 5  # stopped long before 6000 tokens


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(lively_model_dir):
    from sftlab.serve.adapters import load_served
    from sftlab.serve.engine import Closing, Engine, Request

    engine = Engine(load_served(str(lively_model_dir)))

    async def run():
        request = Request([1, 2, 3], engine.served.ids[0], max_tokens=30, temperature=0,
                          events=asyncio.Queue(), loop=asyncio.get_running_loop())  # fmt: skip
        engine.submit(request)
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(asyncio.to_thread(engine.shutdown, 10))
        await asyncio.sleep(0.01)
        with pytest.raises(Closing):
            engine.submit(Request([1], engine.served.ids[0], max_tokens=1))
        events = []
        while not events or events[-1][0] != "done":
            events.append(await asyncio.wait_for(request.events.get(), 20))
        await closing
        return events

    events = asyncio.run(run())
    assert events[-1][2] in ("stop", "length")


def test_serve_refuses_a_public_bind_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("SFTLAB_API_KEY", raising=False)
    assert main(["serve", "whatever", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_data_synth_endpoint_generator_talks_to_sftlab_serve(live):
    from sftlab.curate.generators import EndpointGenerator
    from sftlab.curate.synth import SynthSettings

    gen = EndpointGenerator(live["url"], api_key=KEY)  # no --endpoint-model: the server's first model
    outs = gen.complete(["Task 1\nInstruction:", "Task 2\nInstruction:"], seed=7, s=SynthSettings(num=1, max_new_tokens=8))
    assert gen.model in _models(live) and len(outs) == 2
    assert all(isinstance(o.text, str) and o.stopped is False for o in outs)  # random weights: cut at 8 tokens
    again = gen.complete(["Task 1\nInstruction:", "Task 2\nInstruction:"], seed=7, s=SynthSettings(num=1, max_new_tokens=8))
    assert [o.text for o in again] == [o.text for o in outs]  # seeded sampling repeats
    with pytest.raises(Exception, match="HTTP 401"):
        EndpointGenerator(live["url"], api_key="wrong")


def _models(live):
    r = httpx.get(live["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    return [m["id"] for m in r.json()["data"]]
