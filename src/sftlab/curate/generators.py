"""Where `data synth` gets its text: a local model, or any OpenAI-compatible `/v1/completions` endpoint."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from sftlab.curate.synth import Completion, SynthSettings
from sftlab.errors import SftlabError


class LocalGenerator:
    """A model loaded in this process (anything `sftlab generate` takes), prompts batched together."""

    def __init__(self, source: str):
        from sftlab.rundir import load_run

        self.name = f"model {source}"
        self.loaded = load_run(source)

    def complete(self, prompts: list[str], seed: int, s: SynthSettings) -> list[Completion]:
        from sftlab.generate import Sampling, complete_ids

        tok = self.loaded.tokenizer
        ids = [tok(p)["input_ids"] for p in prompts]  # raw text, no chat template: a list to continue
        sampling = Sampling(s.max_new_tokens, s.temperature, s.top_p, seed)
        return [Completion(text, stopped) for text, stopped in complete_ids(self.loaded.model, tok, ids, sampling,
                                                                             batch_size=len(ids))]  # fmt: skip


class EndpointGenerator:
    """POST /v1/completions, one request per prompt, sent together so a batching server batches them."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        self.base = url.rstrip("/") if url.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"
        self.api_key, self.timeout = api_key, timeout
        self.model = model or self._first_model()
        self.name = f"endpoint model {self.model}"  # not the URL: the same server may move ports between runs

    def _first_model(self) -> str:
        models = self._call("GET", "/models").get("data") or []
        if not models:
            raise SftlabError(f"{self.base}/models lists no model; name one with --endpoint-model")
        return models[0]["id"]

    def complete(self, prompts: list[str], seed: int, s: SynthSettings) -> list[Completion]:
        def one(i: int) -> Completion:
            body = {"model": self.model, "prompt": prompts[i], "max_tokens": s.max_new_tokens,
                    "temperature": s.temperature, "top_p": s.top_p, "seed": seed + i}  # fmt: skip
            choice = self._call("POST", "/completions", body)["choices"][0]
            return Completion(choice.get("text") or "", choice.get("finish_reason") != "length")

        with ThreadPoolExecutor(max_workers=min(len(prompts), 16)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise SftlabError(f"{method} {self.base}{path}: HTTP {e.code}: {_error_message(e.read())}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise SftlabError(f"cannot reach {self.base}{path} ({reason}); is the server up? "
                              "(`sftlab serve MODEL` starts one)") from None  # fmt: skip


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:300].decode("utf-8", "replace")
