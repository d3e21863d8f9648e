"""One worker thread owns the model and serves requests with continuous batching, streaming tokens back.

Requests wait in a bounded queue. The worker decodes a running batch for one model (the base or one
LoRA adapter) a token at a time with a shared KV cache; between steps it drops finished or
abandoned sequences from the batch and cache, and admits waiting requests for the same model into
the free slots (their prompts are prefilled together, then their caches are left-padded to the
batch's length and joined). Each sequence has its own sampling settings, stop strings and
max_tokens; text deltas go to its request's asyncio queue. Written by hand because transformers'
generate() streams only batches of one, takes one set of sampling settings per call and cannot
admit a request mid-generation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch


class QueueFull(Exception):
    pass


class Closing(Exception):
    pass


@dataclass
class Adjust:
    """Per-request changes to the next-token logits, as OpenAI and vLLM define them."""

    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    top_k: int = 0  # sample among the k likeliest only (0: all)
    stop_token_ids: frozenset[int] = frozenset()  # end the choice like end-of-turn
    constraint: object = None  # sftlab.serve.structured.Constraint: tokens that keep the answer valid JSON


@dataclass
class Request:
    prompt_ids: list[int]
    model: str  # a served model id
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # ("delta", choice, text, tokens) | ("done", choice, reason, count) | ("error", msg); tokens: the
    # (id, logprob, [(id, logprob), ...] alternatives) behind the text when logprobs is set, else None
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    first_choice: int = 0  # the choice index of its first row: prompts of one batched request share a queue
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    echo: bool = False  # first send the prompt back, with its tokens' log-probabilities when logprobs is set
    adjust: Adjust | None = None  # what changes the distribution before sampling (None: nothing)
    keep_special: bool = False  # decode special tokens too (tool-call markers such as [TOOL_CALLS] are special)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Row:
    """One sequence being generated: a choice of a request.

    Text is detokenized incrementally and stop strings are looked for in the new text and the stop's
    length before it, so a token costs the same at position 10 and 10,000."""

    WINDOW = 6  # tokens decoded before the new ones: enough context for a merge or a split character

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, request.first_choice + index  # index: the choice in the response
        self.ids: list[int] = []
        self.text = ""  # the text from a stop's length before what was sent (held-back tail included)
        self.sent = 0  # characters of text already emitted
        self.prefix, self.read = 0, 0  # ids[prefix:read] decoded to the text's tail already
        self.longest_stop = max(map(len, request.stop), default=0)
        self.skip = not request.keep_special
        self.scored: list[tuple] | None = [] if request.logprobs is not None else None  # tokens not yet sent
        adjust = request.adjust
        self.state = adjust.constraint.start() if adjust is not None and adjust.constraint is not None else None
        self.counts: dict[int, int] = {}  # generated tokens, for the presence and frequency penalties
        self.done = False
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(request.seed + self.index if request.seed is not None else torch.seed())

    def _window(self, tokenizer) -> tuple[str, str]:
        """The decoded window without and with the tokens not yet read."""
        before = tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=self.skip)
        return before, tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)

    def _decode_new(self, tokenizer) -> str:
        """The text the new tokens add; "" while they end inside a multi-byte character."""
        before, after = self._window(tokenizer)
        if after.endswith("\ufffd") or len(after) < len(before):  # a character split across tokens: wait
            return ""
        self.prefix, self.read = max(0, len(self.ids) - self.WINDOW), len(self.ids)
        return after[len(before) :]

    def text_delta(self, tokenizer) -> tuple[str, bool]:
        """New text safe to send, and whether a stop string ended the choice."""
        start = len(self.text)
        self.text += self._decode_new(tokenizer)
        text = self.text
        for stop in self.request.stop:
            at = text.find(stop, max(self.sent, start - len(stop) + 1))
            if at >= 0:
                delta, self.sent = text[self.sent : at], at
                return delta, True
        safe = max(self.sent, len(text) - self._held(text))  # keep back what may be the start of a stop string
        delta, self.sent = text[self.sent : safe], safe
        if self.sent > 4096 + self.longest_stop:  # sent text matters only as a stop's possible start
            cut = self.sent - self.longest_stop
            self.text, self.sent = self.text[cut:], self.sent - cut
        return delta, False

    def _held(self, text: str) -> int:
        """The longest end of `text` that begins a stop string."""
        if not text or not self.longest_stop:
            return 0
        last = text[-1]
        return max((k for s in self.request.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if s[k - 1] == last and text.endswith(s[:k])), default=0)  # fmt: skip

    def send(self, text: str) -> None:
        """Emit new text with the scored tokens behind it (tokens whose text is held back wait for it)."""
        scored, self.scored = self.scored, [] if self.scored is not None else None
        if text or scored:
            self.request.emit("delta", self.index, text, scored)

    def finish(self, reason: str, tokenizer) -> None:
        if reason != "stop_string":
            self.text += self._flush(tokenizer)
            self.send(self.text[self.sent :])
        elif self.scored:
            self.send("")
        self.done = True
        self.request.emit("done", self.index, "length" if reason == "length" else "stop", len(self.ids))

    def _flush(self, tokenizer) -> str:
        """Whatever the last tokens decode to, a dangling partial character included."""
        before, after = self._window(tokenizer)
        return after[len(before) :] if after.startswith(before) else ""


class _Batch:
    """The running sequences of one model: their KV cache, 2-D attention mask and next inputs."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache over [rows, heads, length, head_dim]
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [rows, length]: 0 for left padding
        self.next_ids = torch.zeros(0, 1, dtype=torch.long)  # [rows, 1]: the token each row feeds next
        self.position = torch.zeros(0, 1, dtype=torch.long)  # [rows, 1]: its position

    def join(self, rows: list[_Row], cache, mask, next_ids, position) -> None:
        """Append prefilled rows, left-padding whichever cache is shorter so both share one length."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_ids, self.position = rows, cache, mask, next_ids, position
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
        self.mask = torch.cat([_left_pad(self.mask, length, dim=1), _left_pad(mask, length, dim=1)])
        self.rows += rows
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.position = torch.cat([self.position, position])

    def prune(self) -> None:
        """Drop finished rows from the batch and cache, and cache columns no remaining row attends to."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long)
            self.rows = [self.rows[i] for i in keep]
            if keep:
                self.cache.batch_select_indices(index.to(self.cache.layers[0].keys.device))
            self.mask, self.next_ids, self.position = self.mask[index], self.next_ids[index], self.position[index]
        if self.rows:
            unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
            if unused:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                self.mask = self.mask[:, unused:]


def _left_pad(x: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Engine:
    def __init__(self, served, max_batch: int = 16, max_queue: int = 128, batch_wait_s: float = 0.01,
                 switch_after_s: float = 0.5):  # fmt: skip
        self.served = served  # sftlab.serve.adapters.Served
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch_wait_s = batch_wait_s  # a moment for concurrent requests to arrive before a new batch starts
        self.switch_after_s = switch_after_s  # a request for another model waits at most about this long
        self._pending: deque[tuple[float, Request]] = deque()
        self._lock = threading.Condition()
        self.closing = False
        self.busy = 0  # requests with rows in the running batch
        self.dropped_rows = 0  # sequences stopped early because their client went away
        self.joined_rows = 0  # sequences admitted into an already running batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="sftlab-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, request: Request) -> None:
        with self._lock:
            if self.closing:
                raise Closing("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (limit {self.max_queue})")
            self._pending.append((time.monotonic(), request))
            self._lock.notify()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new work, let queued and running requests finish for up to grace_s, cancel the rest."""
        with self._lock:
            self.closing = True
        deadline = time.monotonic() + grace_s
        while (self.busy or self._pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left, self._pending = list(self._pending), deque()
        for _, request in left:
            request.cancelled = True
            request.emit("error", "the server shut down before this request ran")
        self._stop.set()
        self._thread.join(timeout=grace_s + 5)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        batch: _Batch | None = None
        while not self._stop.is_set():
            new: list[Request] = []
            try:
                room = self.max_batch - (len(batch.rows) if batch else 0)
                new = self._take(batch.model_id if batch else None, room, wait=batch is None)
                if new:
                    batch = batch or _Batch(new[0].model)
                    self._admit_or_fail(batch, new)
                    new = []  # admitted or answered: an error below concerns the running batch only
                if batch is not None and batch.rows:
                    self._step(batch)
                if batch is not None:
                    batch.prune()
                    if not batch.rows:
                        batch = None
            except Exception as e:  # one bad batch must not take the server down
                running = [r.request for r in batch.rows] if batch else []
                for request in {id(r): r for r in running + new}.values():  # new: failed before joining
                    request.emit("error", f"generation failed: {type(e).__name__}: {e}")
                batch = None
            self.busy = len({id(r.request) for r in batch.rows}) if batch else 0

    def _take(self, model_id: str | None, room: int, wait: bool) -> list[Request]:
        """Waiting requests for `model_id` (any model when None) that fit in `room` rows, oldest first."""
        with self._lock:
            if wait and not self._pending:
                self._lock.wait(timeout=0.1)
                if not self._pending:
                    return []
        if wait:
            time.sleep(self.batch_wait_s)
        with self._lock:
            now = time.monotonic()
            if model_id is not None and any(now - t > self.switch_after_s and r.model != model_id
                                            for t, r in self._pending):  # fmt: skip
                return []  # let the running batch drain so the other model gets its turn
            taken, kept = [], deque()
            alone = False  # an echo prefill keeps every position's logits: it is admitted by itself
            for t, request in self._pending:
                if request.cancelled:
                    continue
                model_id = model_id or request.model
                fits = request.model == model_id and request.n <= room and not alone
                if fits and not (request.echo and taken):
                    taken.append(request)
                    room -= request.n
                    alone = request.echo
                else:
                    kept.append((t, request))
            self._pending = kept
            self.busy += len(taken)
        return taken

    def _admit_or_fail(self, batch: _Batch, requests: list[Request]) -> None:
        """Admit `requests`; if that fails (a bad prompt, say), only they get the error: the running batch
        is untouched until the prefilled rows join it, so its streams go on."""
        try:
            self._admit(batch, requests)
        except Exception as e:  # noqa: BLE001 -- whatever one request breaks, it alone gets the error
            for request in requests:
                request.cancelled = True
                request.emit("error", f"generation failed: {type(e).__name__}: {e}")

    def _admit(self, batch: _Batch, requests: list[Request]) -> None:
        """Prefill new requests together (left-padded) and join them to the running batch."""
        from transformers import DynamicCache

        tok = self.served.tokenizer
        rows = [_Row(r, i) for r in requests for i in range(r.n)]
        prompts = [row.request.prompt_ids for row in rows]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.served.select(batch.model_id) as model:
            device = next(model.parameters()).device
            echo = any(r.echo for r in requests)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=0 if echo else 1)  # fmt: skip
        if echo:
            for row, prompt, logits in zip(rows, prompts, out.logits):
                if row.request.echo:
                    _echo(row, prompt, logits[width - len(prompt) :], tok)
        chosen = self._accept(rows, out.logits[:, -1, :])
        self.joined_rows += len(rows) if batch.rows else 0
        batch.join(rows, out.past_key_values, mask, torch.tensor(chosen).unsqueeze(1), position[:, -1:] + 1)

    def _step(self, batch: _Batch) -> None:
        """One token for every running row."""
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=batch.mask.dtype)], dim=1)
        with self.served.select(batch.model_id) as model:
            device = next(model.parameters()).device
            out = model(input_ids=batch.next_ids.to(device), attention_mask=batch.mask.to(device),
                        position_ids=batch.position.to(device), past_key_values=batch.cache, use_cache=True)  # fmt: skip
        batch.cache = out.past_key_values
        batch.next_ids = torch.tensor(self._accept(batch.rows, out.logits[:, -1, :])).unsqueeze(1)
        batch.position = batch.position + 1

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Sample a token per row, stream it, and mark rows that are finished. A row whose own settings fail
        (its response format, say) ends with an error; the rows beside it go on."""
        logits = logits.float().cpu()
        scored = _scores(rows, logits)  # from the model's own distribution, before temperature and top-p
        for i, row in enumerate(rows):
            if row.request.adjust is not None and not row.done:
                _guarded(row, _adjust, row, logits[i])
        chosen = self._sample(logits, rows)
        for row, token in zip(rows, chosen):
            if not row.done:
                _guarded(row, self._take_token, row, token, scored)
        return [t if not r.done else self.served.tokenizer.pad_token_id for r, t in zip(rows, chosen)]

    def _take_token(self, row: _Row, token: int, scored) -> None:
        tok = self.served.tokenizer
        adjust = row.request.adjust
        ends = token in self.served.eos_ids or (adjust is not None and token in adjust.stop_token_ids)
        if row.scored is not None and not ends:
            row.scored.append(scored(row, token))
        if row.request.cancelled:
            row.done = True
            self.dropped_rows += 1
        elif ends:
            row.finish("stop", tok)
        else:
            row.ids.append(token)
            row.counts[token] = row.counts.get(token, 0) + 1
            if row.state is not None:
                row.state.advance(token)
            delta, stopped = row.text_delta(tok)
            if delta:
                row.send(delta)
            if stopped:
                row.finish("stop_string", tok)
            elif row.state is not None and row.state.done():  # the JSON is complete
                row.finish("stop", tok)
            elif len(row.ids) >= row.request.max_tokens:
                row.finish("length", tok)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Greedy rows by argmax; sampled rows with their own temperature, top-p and generator."""
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            r = row.request
            if row.done or r.temperature <= 0:
                continue
            row_logits = logits[i]
            if r.adjust is not None and 0 < r.adjust.top_k < row_logits.shape[-1]:
                kth = row_logits.topk(r.adjust.top_k).values[-1]
                row_logits = row_logits.masked_fill(row_logits < kth, float("-inf"))
            probs = torch.softmax(row_logits / r.temperature, -1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            cdf = probs.cumsum(-1)  # inverse-CDF draw: much faster than torch.multinomial (benchmarks/RESULTS.md)
            u = torch.rand(1, generator=row.generator) * cdf[-1]
            chosen[i] = min(int(torch.searchsorted(cdf, u)), len(cdf) - 1)
        return chosen


def _scores(rows: list[_Row], logits: torch.Tensor):
    """A function (row, token) -> (token, logprob, alternatives) over the rows that report logprobs."""
    wanted = {id(r): i for i, r in enumerate(rows) if r.scored is not None and not r.done}
    logp = torch.log_softmax(logits[list(wanted.values())], -1) if wanted else None
    where = {key: j for j, key in enumerate(wanted)}

    def score(row: _Row, token: int) -> tuple:
        dist = logp[where[id(row)]]
        return token, float(dist[token]), _top(dist, row.request.logprobs)

    return score


def _top(dist: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if not k:
        return []
    values, ids = dist.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


def _echo(row: _Row, prompt: list[int], logits: torch.Tensor, tokenizer) -> None:
    """Send the prompt back as the first text; with logprobs, each prompt token's log-probability given
    the tokens before it (the first has none), from the prefill's own logits."""
    scored = None
    if row.scored is not None:
        logp = torch.log_softmax(logits[:-1].float(), -1)
        scored = [(prompt[0], None, None)] + [(t, float(logp[i, t]), _top(logp[i], row.request.logprobs))
                                              for i, t in enumerate(prompt[1:])]  # fmt: skip
    row.request.emit("delta", row.index, tokenizer.decode(prompt, skip_special_tokens=False), scored)


def _adjust(row: _Row, logits: torch.Tensor) -> None:
    """logit_bias, then the penalties on what the row generated, then the response format's mask: in place."""
    adjust = row.request.adjust
    if adjust.logit_bias:
        ids = torch.tensor(list(adjust.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(adjust.logit_bias.values()), dtype=logits.dtype)
    if row.counts and (adjust.presence_penalty or adjust.frequency_penalty):
        ids = torch.tensor(list(row.counts), dtype=torch.long)
        counts = torch.tensor(list(row.counts.values()), dtype=logits.dtype)
        logits[ids] -= adjust.frequency_penalty * counts + adjust.presence_penalty
    if row.state is not None:
        row.state.mask(logits)


def _guarded(row: _Row, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- one row's failure ends that row, not the batch it shares
        row.done = True
        row.request.emit("error", f"generation failed: {type(e).__name__}: {e}")
