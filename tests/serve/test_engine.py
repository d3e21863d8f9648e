"""The continuous-batching engine: each request gets its solo answer, a failing prefill fails only its request."""

import asyncio


def _collect(engine, prompts, max_tokens=24, stagger=False):
    """Greedy texts for `prompts` from a live engine; with `stagger`, the first request is already
    decoding when the others arrive (so they must join its running batch)."""
    from sftlab.serve.engine import Request

    async def run():
        loop = asyncio.get_running_loop()
        requests = [Request(p, engine.served.ids[0], max_tokens, temperature=0, events=asyncio.Queue(), loop=loop)
                    for p in prompts]  # fmt: skip
        first_events = []
        engine.submit(requests[0])
        if stagger:
            first_events.append(await asyncio.wait_for(requests[0].events.get(), 60))
        for request in requests[1:]:
            engine.submit(request)
        texts = []
        for n, request in enumerate(requests):
            events = first_events if n == 0 else []
            while not events or events[-1][0] != "done":
                events.append(await asyncio.wait_for(request.events.get(), 60))
            texts.append("".join(e[2] for e in events if e[0] == "delta"))
        return texts

    return asyncio.run(run())


def test_continuous_batching_gives_each_request_its_solo_answer(lively_model_dir):
    """Requests joining a running batch (caches left-padded and joined) decode exactly as they do alone,
    and as transformers' generate() does."""
    from sftlab.generate import Sampling, generate_answers
    from sftlab.rundir import load_run
    from sftlab.serve.adapters import load_served
    from sftlab.serve.engine import Engine

    loaded = load_run(str(lively_model_dir))
    convs = [[{"role": "user", "content": c}] for c in ("a long first question about rivers", "hi", "stone garden?")]
    prompts = [list(loaded.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
               for c in convs]  # fmt: skip
    reference = generate_answers(loaded.model, loaded.tokenizer, convs, Sampling(max_new_tokens=24), batch_size=1)
    engine = Engine(load_served(str(lively_model_dir)), max_batch=2)
    try:
        solo = [_collect(engine, [p])[0] for p in prompts]
        assert engine.joined_rows == 0
        joined = _collect(engine, prompts, stagger=True)  # 3 requests, 2 slots: both later ones join a running batch
    finally:
        engine.shutdown(5)
    assert engine.joined_rows >= 2  # the later requests joined a running batch
    assert solo == joined
    assert [s.strip() for s in solo] == reference


def test_a_failing_prefill_answers_with_an_error_and_the_engine_goes_on(lively_model_dir, monkeypatch):
    from sftlab.serve.adapters import load_served
    from sftlab.serve.engine import Engine

    engine = Engine(load_served(str(lively_model_dir)), max_batch=4)
    real = engine._admit

    def broken(batch, requests):
        if any(r.prompt_ids[0] == 7 for r in requests):
            raise RuntimeError("boom")
        return real(batch, requests)

    monkeypatch.setattr(engine, "_admit", broken)
    from sftlab.serve.engine import Request

    async def run():
        loop = asyncio.get_running_loop()
        bad = Request([7, 8, 9], engine.served.ids[0], 4, temperature=0, events=asyncio.Queue(), loop=loop)
        engine.submit(bad)
        assert (await asyncio.wait_for(bad.events.get(), 30))[0] == "error"
        good = Request([1, 2, 3], engine.served.ids[0], 4, temperature=0, events=asyncio.Queue(), loop=loop)
        engine.submit(good)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await asyncio.wait_for(good.events.get(), 30))
        return events[-1][0]

    try:
        assert asyncio.run(run()) == "done"
    finally:
        engine.shutdown(5)


def test_a_row_whose_own_settings_fail_mid_decode_ends_alone(lively_model_dir):
    """A response format that breaks at a step (a stand-in constraint raising in mask) ends its request
    with an error; a request decoding beside it in the same batch finishes normally."""
    from sftlab.serve.adapters import load_served
    from sftlab.serve.engine import Adjust, Engine, Request

    class Breaks:
        def start(self):
            return self

        def mask(self, logits):
            raise RuntimeError("grammar state lost")

    engine = Engine(load_served(str(lively_model_dir)), max_batch=4, batch_wait_s=0.2)

    async def run():
        loop = asyncio.get_running_loop()
        good = Request([1, 2, 3], engine.served.ids[0], 20, temperature=0, events=asyncio.Queue(), loop=loop)
        bad = Request([1, 2, 3], engine.served.ids[0], 20, temperature=0, events=asyncio.Queue(), loop=loop,
                      adjust=Adjust(constraint=Breaks()))  # fmt: skip
        engine.submit(good)
        engine.submit(bad)
        last = {}
        for name, request in (("good", good), ("bad", bad)):
            event = None
            while event is None or event[0] not in ("done", "error"):
                event = await asyncio.wait_for(request.events.get(), 30)
            last[name] = event
        return last

    try:
        last = asyncio.run(run())
    finally:
        engine.shutdown(5)
    assert last["bad"][0] == "error" and "grammar state lost" in last["bad"][1]
    assert last["good"][0] == "done"
