"""One worker thread owns the model and serves requests in dynamic batches, streaming tokens back.

Requests wait in a bounded queue; the worker takes every waiting request for one model (the base
or one LoRA adapter) up to `max_batch` sequences, decodes them together step by step with a KV
cache (left-padded prompts, per-row sampling, stop strings, max_tokens), and pushes text deltas to
each request's asyncio queue. A cancelled request (client gone) stops costing anything at the next
step. Written by hand because transformers' generate() streams only batches of one and takes one
set of sampling settings per call.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch


class QueueFull(Exception):
    pass


class Closing(Exception):
    pass


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
    events: asyncio.Queue | None = None  # ("delta", index, text) | ("done", index, reason, tokens) | ("error", msg)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Row:
    """One sequence being generated: a choice of a request."""

    def __init__(self, request: Request, index: int):
        self.request, self.index = request, index
        self.ids: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.done = False
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(request.seed + index if request.seed is not None else torch.seed())

    def text_delta(self, tokenizer) -> tuple[str, bool]:
        """New text safe to send, and whether a stop string ended the choice."""
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return "", False
        for stop in self.request.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                delta, self.sent = text[self.sent : at], at
                return delta, True
        hold = max((k for s in self.request.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
        safe = max(self.sent, len(text) - hold)  # keep back what may be the start of a stop string
        delta, self.sent = text[self.sent : safe], safe
        return delta, False

    def finish(self, reason: str, tokenizer) -> None:
        if reason != "stop_string":
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if text[self.sent :]:
                self.request.emit("delta", self.index, text[self.sent :])
        self.done = True
        self.request.emit("done", self.index, "length" if reason == "length" else "stop", len(self.ids))


class Engine:
    def __init__(self, served, max_batch: int = 16, max_queue: int = 128, batch_wait_s: float = 0.01):
        self.served = served  # sftlab.serve.models.Served
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.pending: queue.Queue[Request] = queue.Queue()
        self.closing = False
        self.busy = 0  # requests in the running batch
        self.dropped_rows = 0  # sequences stopped early because their client went away
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="sftlab-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        if self.closing:
            raise Closing("the server is shutting down")
        if self.pending.qsize() >= self.max_queue:
            raise QueueFull(f"{self.pending.qsize()} requests are already waiting (limit {self.max_queue})")
        self.pending.put(request)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new work, let queued and running requests finish for up to grace_s, cancel the rest."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while (self.busy or not self.pending.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        while not self.pending.empty():
            request = self.pending.get_nowait()
            request.cancelled = True
            request.emit("error", "the server shut down before this request ran")
        self._stop.set()
        self._thread.join(timeout=grace_s + 5)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            self.busy = len(batch)
            try:
                self._generate(batch)
            except Exception as e:  # one bad batch must not take the server down
                for request in batch:
                    request.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                self.busy = 0

    def _take_batch(self) -> list[Request]:
        try:
            first = self.pending.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, rows, later = [first], first.n, []
        deadline = time.monotonic() + self.batch_wait_s  # a moment for concurrent requests to arrive
        while rows < self.max_batch:
            try:
                request = self.pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request.model == first.model and rows + request.n <= self.max_batch:
                batch.append(request)
                rows += request.n
            else:
                later.append(request)
        for request in later:  # other models (or no room) go back, ahead of nothing else
            self.pending.put(request)
        return [r for r in batch if not r.cancelled]

    def _generate(self, batch: list[Request]) -> None:
        tok = self.served.tokenizer
        rows = [_Row(r, i) for r in batch for i in range(r.n)]
        prompts = [row.request.prompt_ids for row in rows]
        width = max(map(len, prompts))
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        stops, past = self.served.eos_ids, None
        with self.served.select(batch[0].model) as model:
            device = next(model.parameters()).device
            for step in range(max(r.max_tokens for r in batch)):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=position.to(device), past_key_values=past, use_cache=True)  # fmt: skip
                past = out.past_key_values
                chosen = self._sample(out.logits[:, -1, :].float().cpu(), rows)
                for row, token in zip(rows, chosen):
                    if row.done:
                        continue
                    if row.request.cancelled:
                        row.done = True
                        self.dropped_rows += 1
                        continue
                    if token in stops:
                        row.finish("stop", tok)
                        continue
                    row.ids.append(token)
                    delta, stopped = row.text_delta(tok)
                    if delta:
                        row.request.emit("delta", row.index, delta)
                    if stopped:
                        row.finish("stop_string", tok)
                    elif len(row.ids) >= row.request.max_tokens:
                        row.finish("length", tok)
                if all(row.done for row in rows):
                    break
                ids = torch.tensor([[t if not r.done else pad] for r, t in zip(rows, chosen)])
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                position = position[:, -1:] + 1

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Greedy rows by argmax; sampled rows with their own temperature, top-p and generator."""
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            r = row.request
            if row.done or r.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / r.temperature, -1)
            if r.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            cdf = probs.cumsum(-1)  # inverse-CDF draw: ~50x faster than torch.multinomial over a 49k vocab
            u = torch.rand(1, generator=row.generator) * cdf[-1]
            chosen[i] = min(int(torch.searchsorted(cdf, u)), len(cdf) - 1)
        return chosen
