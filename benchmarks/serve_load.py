"""Server throughput: N concurrent chat requests against one-at-a-time, in the same run.

    python benchmarks/serve_load.py                          # the embedded SmolLM2-135M, 32 requests
    python benchmarks/serve_load.py --source runs/quickstart --requests 64 --max-tokens 64

Starts `sftlab serve SOURCE` in a subprocess (the client runs in this process, so the two do not
share a GIL), sends the same N prompts once sequentially and once all at once (streaming, greedy,
fixed max_tokens), and prints requests/s, completion tokens/s, latency p50/p95/p99 and
time-to-first-token for both, with the concurrent/sequential ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is {a} + {b}?", "Give the opposite of the word: {w}.", "Write one sentence about {w}.",
             "Convert {a} kilometers to meters.", "Name a colour that starts with {l}."]  # fmt: skip
WORDS = ["fast", "river", "happy", "stone", "light", "music", "cloud", "garden"]


def prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)].format(a=10 + i, b=3 * i + 1, w=WORDS[i % len(WORDS)], l="BGRY"[i % 4])
            for i in range(n)]  # fmt: skip


async def one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def measure(url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool) -> dict:
    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(http, model, t, max_tokens) for t in texts))
        else:
            results = [await one(http, model, t, max_tokens) for t in texts]
        wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in results)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": wall, "req_s": len(texts) / wall, "tok_s": tokens / wall, "tokens": tokens,
            "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
            "ttft_p50": statistics.median(r["ttft"] for r in results)}  # fmt: skip


def start_server(source: str, port: int, max_batch: int) -> subprocess.Popen:
    sftlab = Path(sys.executable).parent / "sftlab"
    proc = subprocess.Popen([str(sftlab), "serve", source, "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", "1024"], env=os.environ.copy())  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
    proc.kill()
    sys.exit("the server did not start within 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m-instruct", help="run dir or model.name to serve")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.source, port, args.max_batch)
    try:
        url = f"http://127.0.0.1:{port}"
        model = httpx.get(url + "/v1/models").json()["data"][-1]["id"]
        texts = prompts(args.requests)
        asyncio.run(measure(url, model, texts[:2], 4, False))  # warm-up
        seq = asyncio.run(measure(url, model, texts, args.max_tokens, False))
        par = asyncio.run(measure(url, model, texts, args.max_tokens, True))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"\nserve {args.source} (model {model}): {args.requests} chat requests, max_tokens {args.max_tokens}, "
          f"greedy, max_batch {args.max_batch}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'':24}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'TTFT p50':>10}{'wall s':>8}")
    for name, r in (("one at a time", seq), (f"{args.requests} concurrent", par)):
        print(f"{name:24}{r['req_s']:8.2f}{r['tok_s']:9.1f}{r['p50']:8.2f}{r['p95']:8.2f}{r['p99']:8.2f}"
              f"{r['ttft_p50']:10.2f}{r['wall_s']:8.1f}")  # fmt: skip
    print(f"concurrent / one at a time: {par['req_s'] / seq['req_s']:.2f}x requests/s, "
          f"{par['tok_s'] / seq['tok_s']:.2f}x tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()
