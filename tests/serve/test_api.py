"""The server's request handling called directly: a fake engine and tokenizer, no model, server or HTTP client."""

import asyncio
import json

import pytest

from sftlab.serve.api import (
    Api,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Limits,
    chunk,
    complete,
    schema_error,
    stream,
    usage,
)
from sftlab.serve.engine import Closing, QueueFull, Request


class FakeTokenizer:
    """One token per character; records what the chat template was asked to render."""

    def __init__(self):
        self.rendered = []

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0] * add_special_tokens + [ord(c) for c in text]}

    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, chat_template=None, **kw):
        if any(m["role"] == "assistant" for m in messages[:1]):
            raise ValueError("conversations start with the user")
        self.rendered.append((messages, chat_template, kw))
        return [ord(c) for m in messages for c in m["content"]]


class FakeServed:
    def __init__(self, context_length=100):
        self.adapters = {"base": None, "alpha": "alpha"}
        self.templates = {"alpha": "ALPHA-TEMPLATE"}
        self.tokenizer = FakeTokenizer()
        self.context_length = context_length
        self.vocab_size = 1000

    @property
    def ids(self):
        return list(self.adapters)


class FakeEngine:
    def __init__(self, served=None, max_batch=4, fail=None):
        self.served = served or FakeServed()
        self.max_batch, self.closing, self.queued, self.busy = max_batch, False, 2, 1
        self.fail, self.submitted = fail, []

    def submit(self, request):
        if self.fail:
            raise self.fail
        self.submitted.append(request)


def _api(limits=None, **engine):
    return Api(FakeEngine(**engine), limits or Limits(max_tokens=50, default_max_tokens=20, max_n=3), api_key="k")


def _chat(**kw):
    return ChatRequest(model=kw.pop("model", "alpha"), messages=kw.pop("messages", [{"role": "user", "content": "hi"}]),
                       **kw)  # fmt: skip


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args)
    return err.value


def _request(api, body, prompt):
    """make_request inside an event loop (a Request holds the loop its events are read on)."""

    async def make():
        return api.make_request(body, prompt)

    return _run(make())


def _run(coro):
    """Run `coro` on a fresh event loop; a response that never ends fails the test instead of hanging it."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout=5)

    return asyncio.run(bounded())


def _events(n, *events, model="alpha", prompt=(1, 2, 3)):
    """A request whose queue already holds `events`, as the engine's worker emits them; run inside the loop."""
    request = Request(list(prompt), model, 10, n=n, events=asyncio.Queue(), loop=asyncio.get_running_loop())
    for event in events:
        request.events.put_nowait(event)
    return request


async def _connected():
    return False


# ------------------------------------------------------------------ auth, health, models, schema errors


def test_authorize_wants_the_bearer_key_only_when_the_server_has_one():
    api = _api()
    api.authorize("Bearer k")
    api.authorize("bearer k")
    for header in ("", "k", "Bearer wrong", "Basic k"):
        err = _error(api.authorize, header)
        assert err.status == 401 and err.body()["error"]["code"] == "invalid_api_key"
    Api(FakeEngine(), api_key=None).authorize("")


def test_health_and_models_list_the_served_ids():
    api = _api()
    assert api.health() == {"status": "ok", "models": ["base", "alpha"], "queued": 2, "running": 1}
    api.engine.closing = True
    assert api.health()["status"] == "shutting_down"
    listed = api.models()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["base", "alpha"]
    assert {m["created"] for m in listed["data"]} == {api.created} and listed["data"][0]["owned_by"] == "sftlab"


def test_schema_errors_name_the_first_problem_without_the_body_prefix():
    err = schema_error([{"loc": ("body", "messages", 0, "role"), "msg": "bad role"}, {"loc": ("body", "x")}])
    assert err.status == 422
    assert err.body() == {"error": {"message": "messages.0.role: bad role", "type": "invalid_request_error",
                                    "param": "messages.0.role", "code": "invalid_schema"}}  # fmt: skip
    assert schema_error([]).body()["error"] == {"message": "body: invalid request", "type": "invalid_request_error",
                                                "param": None, "code": "invalid_schema"}  # fmt: skip


# ------------------------------------------------------------------ prompts


def test_an_unknown_model_is_404_model_not_found():
    api = _api()
    api.check_model("alpha")
    for fn, body in ((api.chat_prompt, _chat(model="gpt-4")), (api.completion_prompts, CompletionRequest(model="gpt-4",
                                                                                                       prompt="x"))):  # fmt: skip
        err = _error(fn, body)
        assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
        assert "'gpt-4' does not exist; served: base, alpha" in str(err)
    assert api.served.tokenizer.rendered == []  # refused before rendering


def test_chat_prompt_renders_with_the_models_template_and_openai_roles():
    api = _api()
    body = _chat(messages=[{"role": "developer", "content": "be"}, {"role": "user", "content": [
        {"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
        {"role": "assistant", "content": None}])  # fmt: skip
    assert api.chat_prompt(body) == [ord(c) for c in "behi"]
    messages, template, kw = api.served.tokenizer.rendered[0]
    assert messages == [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": ""}]  # fmt: skip
    assert template == "ALPHA-TEMPLATE" and kw["add_generation_prompt"] is True
    api.chat_prompt(_chat(model="base"))
    assert api.served.tokenizer.rendered[1][1] is None  # the base model: the tokenizer's own template


def test_a_content_part_a_text_model_cannot_read_is_refused_not_dropped():
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "image_url"}]}])
    err = _error(_api().chat_prompt, body)
    assert (err.status, err.param) == (400, "messages") and "'image_url'" in str(err)


def test_a_conversation_the_template_rejects_is_400_on_messages():
    err = _error(_api().chat_prompt, _chat(messages=[{"role": "assistant", "content": "hello"}]))
    assert (err.status, err.param) == (400, "messages") and "conversations start with the user" in str(err)


def test_completion_prompts_take_text_texts_ids_and_lists_of_ids():
    api = _api()
    prompts = lambda p: api.completion_prompts(CompletionRequest(model="base", prompt=p))  # noqa: E731
    assert prompts("ab") == [[0, 97, 98]]  # text: with the model's special tokens
    assert prompts(["ab"]) == [[0, 97, 98]]
    assert prompts(["a", "b"]) == [[0, 97], [0, 98]]
    assert prompts([5, 6]) == [[5, 6]]  # ids: as sent (lm-evaluation-harness)
    assert prompts([[5], [6, 7]]) == [[5], [6, 7]]
    for bad, where in (("", "prompt"), ([], "prompt"), ([[]], "prompt"), ([5, 1000], "prompt"), (["a", ""], "prompt.1"),
                       ("\ud800x", "prompt")):  # fmt: skip
        err = _error(prompts, bad)
        assert (err.status, err.param) == (400, "prompt") and str(err).startswith(where), (bad, str(err))
    assert "outside the vocabulary (0..999)" in str(_error(prompts, [5, 1000]))
    assert "not valid Unicode" in str(_error(prompts, "\ud800x"))
    err = _error(prompts, ["a"] * 65)
    assert "65 prompts, above this server's limit of 64" in str(err)


def test_a_field_the_server_cannot_honour_is_refused_by_name():
    api = _api()
    for field in ("functions", "best_of", "suffix", "made_up"):
        err = _error(api.chat_prompt, _chat(**{field: {"x": 1}}))
        assert (err.status, err.param) == (400, field) and "not supported" in str(err)
    api.chat_prompt(_chat(user="u", metadata={"k": "v"}, store=False, made_up=None))  # no effect on the answer


def test_seed_out_of_range_and_lone_surrogates_are_400_not_500():
    from pydantic import ValidationError

    for seed in (-1, 2**63, 2**64):
        with pytest.raises(ValidationError):
            _chat(seed=seed)
    _chat(seed=2**63 - 1)
    err = _error(_api().chat_prompt, _chat(messages=[{"role": "user", "content": "a\udfffb"}]))
    assert (err.status, err.param) == (400, "messages.0.content")


# ------------------------------------------------------------------ make_request: the size checks


def test_make_request_carries_the_sampling_settings():
    body = _chat(max_tokens=7, temperature=0.5, top_p=0.9, n=2, stop="END", seed=3)
    r = _request(_api(), body, [1, 2])
    assert (r.prompt_ids, r.model, r.max_tokens, r.temperature, r.top_p, r.n, r.stop, r.seed) == (
        [1, 2], "alpha", 7, 0.5, 0.9, 2, ["END"], 3)  # fmt: skip
    assert isinstance(r.events, asyncio.Queue) and r.loop is not None and not r.cancelled


def test_max_tokens_above_the_limit_is_400():
    api = _api()
    for body in (_chat(max_tokens=51), _chat(max_completion_tokens=51), _chat(max_tokens=5, max_completion_tokens=51)):
        err = _error(api.make_request, body, [1])
        assert (err.status, err.param, err.code) == (400, "max_tokens", None) and "limit of 50" in str(err)
    assert _request(api, _chat(max_tokens=51, max_completion_tokens=50), [1]).max_tokens == 50  # the newer name wins
    assert _request(api, _chat(max_tokens=50), [1]).max_tokens == 50


def test_n_above_the_server_or_batch_limit_is_400():
    err = _error(_api().make_request, _chat(n=4), [1])  # max_n 3
    assert (err.status, err.param) == (400, "n") and "limit of 3" in str(err)
    err = _error(_api(max_batch=2).make_request, _chat(n=3), [1])  # a choice is a batch row
    assert (err.status, err.param) == (400, "n") and "limit of 2" in str(err)
    assert _request(_api(), _chat(n=3), [1]).n == 3


def test_a_prompt_longer_than_the_context_is_400_context_length_exceeded():
    api = _api()  # context 100
    for prompt in ([1] * 100, [1] * 150):
        err = _error(api.make_request, _chat(), prompt)
        assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
        assert f"{len(prompt)} tokens, more than the model's context of 100" in str(err)
    err = _error(api.make_request, _chat(max_tokens=11), [1] * 90)  # fits alone, not with the answer
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "max_tokens")
    assert _request(api, _chat(max_tokens=10), [1] * 90).max_tokens == 10


def test_without_max_tokens_the_default_shrinks_to_the_room_left():
    api = _api()  # default 20, context 100
    assert _request(api, _chat(), [1] * 10).max_tokens == 20
    assert _request(api, _chat(), [1] * 95).max_tokens == 5
    assert _request(api, CompletionRequest(model="base", prompt="x"), [1]).max_tokens == 16  # the legacy default


def test_stop_strings_are_bounded_in_number_and_length_and_empty_ones_are_ignored():
    api = _api()
    err = _error(api.make_request, _chat(stop=["a", "b", "c", "d", "e"]), [1])
    assert (err.status, err.param) == (400, "stop")
    assert _request(api, _chat(stop=["", "a", "", "b", "c", "d", ""]), [1]).stop == ["a", "b", "c", "d"]
    assert _request(api, _chat(stop=[""]), [1]).stop == []
    assert _request(api, _chat(stop=""), [1]).stop == []  # a bare "" would end every answer at once
    assert _request(api, _chat(), [1]).stop == []
    err = _error(api.make_request, _chat(stop=["x" * 257]), [1])
    assert (err.status, err.param) == (400, "stop") and "at most 256 characters" in str(err)
    assert _request(_api(Limits(max_stop=8)), _chat(stop=list("abcdefgh")), [1]).stop == list("abcdefgh")


def test_a_batched_completion_is_one_request_per_prompt_on_one_queue():
    api = _api()

    async def go():
        return api.make_requests(CompletionRequest(model="base", prompt=["a", "b"], n=1), [[1], [2, 3]])

    group = _run(go())
    assert [r.prompt_ids for r in group] == [[1], [2, 3]] and [r.first_choice for r in group] == [0, 1]
    assert group[0].events is group[1].events
    assert usage(group, [1, 2]) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_submit_turns_a_full_queue_and_shutdown_into_503():
    for fail, code in ((QueueFull("9 waiting"), "server_overloaded"), (Closing("the server is shutting down"),
                                                                       "shutting_down")):  # fmt: skip
        err = _error(_api(fail=fail).submit, object())
        assert (err.status, err.type, err.code) == (503, "server_error", code) and str(fail) in str(err)


def test_start_queues_the_request_and_names_the_response():
    api = _api()

    async def go():
        return api.start(_chat(), [[1]], chat=True), api.start(CompletionRequest(model="base", prompt="x"), [[1]], False)

    ([chat_req], chat_id), ([cmpl_req], cmpl_id) = _run(go())
    assert api.engine.submitted == [chat_req, cmpl_req]
    assert chat_id.startswith("chatcmpl-") and len(chat_id) == 9 + 24 and cmpl_id.startswith("cmpl-")

    async def too_long():
        return api.start(_chat(max_tokens=99), [[1]], True)

    with pytest.raises(ApiError):  # nothing is queued when a check fails
        _run(too_long())
    assert len(api.engine.submitted) == 2


# ------------------------------------------------------------------ complete: the whole response


def test_complete_assembles_texts_finish_reasons_and_usage_from_engine_events():
    events = [("delta", 1, "wor", None), ("delta", 0, "hel", None), ("delta", 0, "lo", None), ("done", 0, "stop", 4),
              ("delta", 1, "ld", None), ("done", 1, "length", 6)]  # fmt: skip

    async def go(chat):
        request = _events(2, *events)
        return request, await complete([request], "rid-1", chat, _connected)

    request, out = _run(go(chat=True))
    assert request.cancelled  # the rows are released either way
    assert out["id"] == "rid-1" and out["object"] == "chat.completion" and out["model"] == "alpha"
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop", "logprobs": None},
        {"index": 1, "message": {"role": "assistant", "content": "world"}, "finish_reason": "length", "logprobs": None},
    ]
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
    _, out = _run(go(chat=False))
    assert out["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [(0, "hello", "stop"),
                                                                                    (1, "world", "length")]  # fmt: skip


def test_complete_turns_an_engine_error_into_503_at_shutdown_else_500():
    for message, status in (("the server shut down before this request ran", 503), ("generation failed: boom", 500)):

        async def go(message):
            request = _events(1, ("delta", 0, "x", None), ("error", message))
            with pytest.raises(ApiError) as err:
                await complete([request], "r", True, _connected)
            return request, err.value

        request, err = _run(go(message))
        assert (err.status, err.type, str(err)) == (status, "server_error", message) and request.cancelled


def test_complete_gives_up_when_the_client_has_gone():
    asked = []

    async def gone():
        asked.append(1)
        return len(asked) >= 2

    async def go():
        request = _events(1, ("delta", 0, "x", None))
        return request, await complete([request], "r", True, gone, poll_s=0.01)

    request, out = _run(go())
    assert out == {} and len(asked) == 2 and request.cancelled  # cancelled: the engine drops its rows


def test_complete_waits_on_events_the_engine_emits_from_its_thread():
    import threading

    async def go():
        request = _events(1)
        worker = threading.Thread(target=lambda: [request.emit("delta", 0, "ok", None), request.emit("done", 0, "stop", 1)])
        worker.start()
        out = await complete([request], "r", False, _connected, poll_s=0.01)
        worker.join()
        return out

    assert _run(go())["choices"][0]["text"] == "ok"


# ------------------------------------------------------------------ stream: server-sent events


def _stream(n, events, chat=True, include_usage=False):
    body = _chat(stream=True, stream_options={"include_usage": include_usage})

    async def go():
        request = _events(n, *events)
        return request, [e async for e in stream([request], "rid-2", chat, body)]

    request, lines = _run(go())
    assert request.cancelled
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    return [line[6:-2] for line in lines]


def test_stream_sends_role_deltas_finish_usage_and_done():
    out = _stream(1, [("delta", 0, "hé", None), ("delta", 0, "llo", None), ("done", 0, "stop", 3)], include_usage=True)
    assert out[-1] == "[DONE]"
    events = [json.loads(x) for x in out[:-1]]
    assert all((e["id"], e["object"], e["model"]) == ("rid-2", "chat.completion.chunk", "alpha") for e in events)
    assert len({e["created"] for e in events}) == 1
    assert [e["choices"][0]["delta"] for e in events[:4]] == [{"role": "assistant", "content": ""}, {"content": "hé"},
                                                              {"content": "llo"}, {}]  # fmt: skip
    assert [e["choices"][0]["finish_reason"] for e in events[:4]] == [None, None, None, "stop"]
    assert events[4]["choices"] == [] and events[4]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                                 "total_tokens": 6}  # fmt: skip
    assert len(events) == 5
    assert '"hé"' in out[1]  # text goes out as UTF-8, not \\u escapes


def test_stream_without_usage_and_with_several_choices():
    out = _stream(2, [("delta", 1, "b", None), ("done", 1, "length", 1), ("delta", 0, "a", None), ("done", 0, "stop", 2)])
    events = [json.loads(x) for x in out[:-1]]
    assert out[-1] == "[DONE]" and not any("usage" in e for e in events)
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"], e["choices"][0]["finish_reason"]) for e in events] == [
        (0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None),
        (1, {"content": "b"}, None), (1, {}, "length"), (0, {"content": "a"}, None), (0, {}, "stop")]  # fmt: skip


def test_a_completion_stream_has_text_chunks_and_no_role_chunk():
    out = _stream(1, [("delta", 0, "ab", None), ("done", 0, "stop", 1)], chat=False, include_usage=True)
    events = [json.loads(x) for x in out[:-1]]
    assert [e["object"] for e in events] == ["text_completion"] * 3
    assert [(e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events[:2]] == [("ab", None),
                                                                                                ("", "stop")]  # fmt: skip
    assert events[2]["usage"]["completion_tokens"] == 1 and out[-1] == "[DONE]"


def test_an_engine_error_ends_the_stream_with_an_error_event():
    out = _stream(2, [("delta", 0, "a", None), ("error", "generation failed: boom"), ("delta", 1, "never", None)])
    assert out[-1] == "[DONE]" and len(out) == 5  # 2 role chunks, 1 delta, the error, [DONE]
    assert json.loads(out[3]) == {"error": {"message": "generation failed: boom", "type": "server_error",
                                            "param": None, "code": None}}  # fmt: skip


def test_a_stream_closed_early_cancels_the_request():
    async def go():
        request = _events(1, ("delta", 0, "a", None))
        events = stream([request], "r", True, _chat(stream=True))
        await events.__anext__()  # the role chunk; then the client hangs up
        await events.aclose()
        return request

    assert _run(go()).cancelled


# ------------------------------------------------------------------ chunks and usage


def test_chunk_and_usage():
    head = {"id": "i", "object": "o", "created": 1, "model": "m"}
    assert chunk(head, True, 2, "x") == 'data: {"id": "i", "object": "o", "created": 1, "model": "m", "choices": ' \
                                        '[{"index": 2, "delta": {"content": "x"}, "finish_reason": null, ' \
                                        '"logprobs": null}]}\n\n'  # fmt: skip
    assert json.loads(chunk(head, True, 0, "", reason="stop")[6:])["choices"][0]["delta"] == {}
    assert json.loads(chunk(head, False, 0, None)[6:])["choices"][0]["text"] == ""
    request = Request([1] * 7, "m", 5)
    assert usage(request, [2, 3]) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
