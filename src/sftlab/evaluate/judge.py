"""An LLM judge of `sftlab eval --compare`'s side-by-side answers, through any OpenAI-compatible endpoint.

Two judgments per prompt (eval/samples.jsonl rows):
- single-answer grades: each model's answer graded 1-10 on its own (`Rating: [[N]]`);
- pairwise verdicts: tuned against base, asked in both orders (A=tuned, B=base, then A=base, B=tuned) to
  cancel position bias. Rule: a model wins only when both orders prefer it; every other combination is a
  tie, and a pair whose orders disagree (win/loss, or win/tie) is counted `inconsistent` (`flips`: the
  win-in-one, loss-in-the-other ones, the signature of pure position bias). Identical answers are a tie
  without asking.

A reply without a parseable grade or verdict gets one follow-up asking for just that line; still none and
the judgment is missing (counted, never a score). A request that fails (after retries on connection errors,
429 and 5xx) is missing too, and not cached, so a rerun asks it again.

Cache (append-only JSONL, one line per reply): {"key", "model", "template", "reply"}; key = sha256 of (judge
model, TEMPLATE, the exact messages sent). Each reply is written as it arrives, so an interrupted run resumes
asking only what has no reply yet; a partial last line (a kill mid-write) is skipped.

Human agreement: `sftlab ui` keeps blind ratings in SQLite (ui/store.py's schema). The ui layer sits above
evaluate, so the two tables needed are read here directly (read-only); tests/evaluate/test_judge.py builds
its store with the ui's own Store, so a schema change there fails that test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx

from sftlab.errors import ConfigError, DataError

TEMPLATE = "sftlab-judge-1"  # bump on any change to the prompts below: it is part of every cache key
MAX_TOKENS = 512
WORKERS = 4
RETRIES = 3  # further attempts after a connection error, 429 or 5xx
BACKOFF_S = 0.5  # before the first retry; doubled before each next one
CLASSES = ("tuned", "base", "tie")
KEY_ENV = ("SFTLAB_JUDGE_API_KEY", "OPENAI_API_KEY")

_CRITERIA = ("Judge correctness first, then helpfulness, relevance, depth and clarity. Length is no merit in itself, "
             "and a confident wrong answer is worse than a cautious partial one.")  # fmt: skip
_REFERENCE = (" A reference answer is included: a reply that contradicts its facts or result is wrong, but a reply "
              "need not follow its wording.")  # fmt: skip
SINGLE_SYSTEM = ("You grade one reply of an AI assistant to a user's request. " + _CRITERIA + "{reference} Write a "
                 "brief justification of a few sentences, then end with your grade alone on the last line, exactly "
                 "as `Rating: [[N]]`, N an integer from 1 (useless or wrong) to 10 (excellent).")  # fmt: skip
PAIR_SYSTEM = ("You compare two replies, A and B, of AI assistants to the same user request, and decide which serves "
               "the user better. " + _CRITERIA + " Which reply is shown first says nothing about its quality."
               "{reference} Write a brief justification of a few sentences, then end with your verdict alone on the "
               "last line, exactly one of: `[[A]]` (A is better), `[[B]]` (B is better), `[[C]]` (about equally "
               "good).")  # fmt: skip
SINGLE_NUDGE = "Your reply has no grade in the required form. Answer with only the line `Rating: [[N]]` (1-10)."
PAIR_NUDGE = "Your reply has no verdict in the required form. Answer with only one of `[[A]]`, `[[B]]` or `[[C]]`."

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)  # reasoning models' hidden part: not the verdict
_GRADE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_GRADE_LOOSE = re.compile(r"rating\s*[:=]?\s*\**\s*\[*\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\]*", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_VERDICT_LOOSE = re.compile(r"verdict\s*[:=]?\s*\**\s*\[*\s*(A|B|C|tie)\b", re.IGNORECASE)


def parse_grade(reply: str | None) -> float | None:
    """The last `[[N]]` (or, failing that, `Rating: N`) of a reply when N is in 1..10; None otherwise."""
    text = _THINK.sub("", reply or "")
    found = _GRADE.findall(text) or _GRADE_LOOSE.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def parse_verdict(reply: str | None) -> str | None:
    """'A', 'B' or 'C' (a tie) from the last `[[A]]`/`[[B]]`/`[[C]]` (`[[tie]]`, or a loose `Verdict: A`)."""
    text = _THINK.sub("", reply or "")
    found = _VERDICT.findall(text) or _VERDICT_LOOSE.findall(text)
    if not found:
        return None
    label = found[-1].upper()
    return "C" if label == "TIE" else label


# --- prompts -------------------------------------------------------------------------------------------------


def _conversation(row: dict) -> str:
    """The request as the judge sees it: earlier turns (system prompt included) as context, then the question."""
    messages = row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}]
    context = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    parts = [f"<conversation>\n{context}\n</conversation>"] if context else []
    return "\n\n".join(parts + [f"<question>\n{messages[-1]['content']}\n</question>"])


def _reference(row: dict) -> tuple[str, str]:
    ref = row.get("reference")
    if not isinstance(ref, str) or not ref.strip():
        return "", ""
    return _REFERENCE, f"\n\n<reference>\n{ref}\n</reference>"


def single_messages(row: dict, answer: str) -> list[dict]:
    hint, ref = _reference(row)
    user = f"{_conversation(row)}{ref}\n\n<reply>\n{answer}\n</reply>"
    return [{"role": "system", "content": SINGLE_SYSTEM.format(reference=hint)}, {"role": "user", "content": user}]


def pair_messages(row: dict, answer_a: str, answer_b: str) -> list[dict]:
    hint, ref = _reference(row)
    user = f"{_conversation(row)}{ref}\n\n<reply_a>\n{answer_a}\n</reply_a>\n\n<reply_b>\n{answer_b}\n</reply_b>"
    return [{"role": "system", "content": PAIR_SYSTEM.format(reference=hint)}, {"role": "user", "content": user}]


# --- the endpoint --------------------------------------------------------------------------------------------


class RequestFailed(Exception):
    """One judge request that got no usable reply (after retries); its judgment is missing."""


class Client:
    """Chat completions against an OpenAI-compatible base URL (…/v1), with timeouts and retries."""

    def __init__(self, endpoint: str, api_key: str | None = None, transport=None, timeout: float = 120.0,
                 retries: int = RETRIES, backoff_s: float | None = None):  # fmt: skip
        self.endpoint = endpoint.rstrip("/")
        key = api_key or next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(headers=headers, transport=transport, timeout=httpx.Timeout(timeout, connect=10.0))
        self.retries, self.backoff_s = retries, BACKOFF_S if backoff_s is None else backoff_s
        self.requests = 0  # chat requests made (one retried after a 5xx counts once)
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        """The endpoint's model ids; a clear error when it cannot be reached. A bare host:port that answers
        404 is tried again with /v1 (the path `sftlab serve` and most servers use)."""
        response = self._models_at(self.endpoint)
        if response.status_code == 404 and not self.endpoint.endswith("/v1"):
            retried = self._models_at(self.endpoint + "/v1")
            if retried.status_code != 404:
                self.endpoint, response = self.endpoint + "/v1", retried
        _check_auth(response, self.endpoint)
        if response.status_code != 200:
            return []
        try:
            return [m["id"] for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return []

    def _models_at(self, base: str) -> httpx.Response:
        try:
            return self._send("GET", f"{base}/models")
        except RequestFailed as e:
            raise ConfigError(f"judge endpoint {base} is unreachable ({e}); is the server running? "
                              "(`sftlab serve RUN_DIR` serves one at http://127.0.0.1:8000/v1)") from None  # fmt: skip

    def chat(self, model: str, messages: list[dict], max_tokens: int) -> str:
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        with self._lock:
            self.requests += 1
        response = self._send("POST", f"{self.endpoint}/chat/completions", json=body)
        _check_auth(response, self.endpoint)
        if response.status_code != 200:
            raise RequestFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed(f"not a chat completion: {response.text[:200]}") from None

    def _send(self, method: str, url: str, **kw) -> httpx.Response:
        """The response, retrying connection errors, 429 and 5xx with exponential backoff."""
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, url, **kw)
                if response.status_code != 429 and response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise RequestFailed(problem)

    def close(self) -> None:
        self.http.close()


def _check_auth(response: httpx.Response, endpoint: str) -> None:
    """A refused key fails every request alike: stop at the first one."""
    if response.status_code in (401, 403):
        raise ConfigError(f"judge endpoint {endpoint} refused the API key (HTTP {response.status_code}); set "
                          f"SFTLAB_JUDGE_API_KEY (or OPENAI_API_KEY) to a key it accepts")  # fmt: skip


# --- the cache -----------------------------------------------------------------------------------------------


def cache_key(model: str, messages: list[dict]) -> str:
    text = json.dumps([model, TEMPLATE, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Cache:
    """Replies by cache_key, kept in memory and appended to `path` (None: memory only) as they arrive."""

    def __init__(self, path: Path | None):
        self.path, self.replies, self._lock = path, {}, threading.Lock()
        if path is not None and Path(path).is_file():
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill: that reply is asked again

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, model: str, reply: str) -> None:
        with self._lock:
            self.replies[key] = reply
            if self.path is None:
                return
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": model, "template": TEMPLATE, "reply": reply},
                                   ensure_ascii=False) + "\n")  # fmt: skip


# --- judging -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    value: float | str | None  # a grade, a verdict letter, or None (missing)
    status: str  # "ok", "unparsed" (no verdict after the follow-up) or "failed" (no reply)
    error: str | None = None


class Judge:
    def __init__(self, client: Client, model: str, cache: Cache, max_tokens: int = MAX_TOKENS):
        self.client, self.model, self.cache, self.max_tokens = client, model, cache, max_tokens
        self.cached = 0  # replies taken from the cache
        self._lock = threading.Lock()

    def judge(self, messages: list[dict], parse, nudge: str) -> Outcome:
        """Ask, parse; on no parse, ask once more with the reply and a nudge for the bare verdict line."""
        try:
            reply = self._ask(messages)
            value = parse(reply)
            if value is None:
                follow_up = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": nudge}]
                value = parse(self._ask(follow_up))
        except RequestFailed as e:
            return Outcome(None, "failed", str(e))
        return Outcome(value, "ok" if value is not None else "unparsed")

    def _ask(self, messages: list[dict]) -> str:
        key = cache_key(self.model, messages)
        reply = self.cache.get(key)
        if reply is not None:
            with self._lock:
                self.cached += 1
            return reply
        reply = self.client.chat(self.model, messages, self.max_tokens)
        self.cache.put(key, self.model, reply)
        return reply


def judge_samples(rows: list[dict], endpoint: str, model: str | None = None, *, api_key: str | None = None,
                  cache: Path | None = None, ratings: list[Path] = (), workers: int = WORKERS,
                  max_tokens: int = MAX_TOKENS, seed: int = 0, transport=None, say=print,
                  progress: bool = True, sources: set[str] | None = None) -> dict:  # fmt: skip
    """Grade and compare `rows` (samples.jsonl's; pairwise needs base_answer) with the judge at `endpoint`.

    model: the judge's model id (default: the first one the endpoint lists); ratings: `sftlab ui` SQLite
    stores to measure agreement with (ratings_stores()); transport: an httpx transport (tests); sources: judge
    only the rows of these sources (open-ended answers; code and choices are scored by their tasks). Returns
    {"judge": {endpoint, model, template, requests, cached, failed, unparsed}, "single": single_summary(),
    "pairwise": pairwise_summary() or None (no base answers), "agreement": human_agreement() or None,
    "items": one {index, source, grade: {model, base}, orders, verdict} per judged row}."""
    indices = [i for i, r in enumerate(rows)
               if isinstance(r.get("answer"), str) and (sources is None or r.get("source") in sources)]  # fmt: skip
    rows = [rows[i] for i in indices]
    if not rows:
        raise DataError("nothing to judge: the samples have no answers (run `sftlab eval RUN_DIR --compare` first)")
    client = Client(endpoint, api_key, transport)
    try:
        judge = Judge(client, _judge_model(client, model), Cache(cache), max_tokens)
        jobs = _jobs(rows)
        say(f"judging {len(rows)} prompts with {judge.model} at {client.endpoint} ({len(jobs)} judgments)")
        outcomes = _run(judge, jobs, workers, progress)
    finally:
        client.close()
    failed = [o for o in outcomes.values() if o.status == "failed"]
    if failed and len(failed) == len(outcomes):
        raise ConfigError(f"judge endpoint {client.endpoint}: every request failed; the first: {failed[0].error}")
    record = {"judge": {"endpoint": client.endpoint, "model": judge.model, "template": TEMPLATE,
                        "requests": client.requests, "cached": judge.cached, "failed": len(failed),
                        "unparsed": sum(o.status == "unparsed" for o in outcomes.values())}}  # fmt: skip
    items = _items(rows, outcomes)
    for item, index in zip(items, indices):
        item["index"] = index  # the line of samples.jsonl
    record["single"] = single_summary(items, seed)
    record["pairwise"] = pairwise_summary(items, seed) if any("base_answer" in r for r in rows) else None
    record["agreement"] = human_agreement(ratings, rows, items) if ratings and record["pairwise"] else None
    record["items"] = items
    return record


def probe(endpoint: str, model: str | None = None, api_key: str | None = None, transport=None) -> tuple[str, str]:
    """(the endpoint as it will be used, the judge model id): the checks judge_samples starts with, to run
    before an eval's long generation so a wrong URL or a refused key fails in a second, not after it."""
    client = Client(endpoint, api_key, transport)
    try:
        model = _judge_model(client, model)  # first: it may settle the endpoint on its /v1
        return client.endpoint, model
    finally:
        client.close()


def _judge_model(client: Client, model: str | None) -> str:
    listed = client.models()  # also the reachability check, before any judging starts
    if model:
        return model
    if not listed:
        raise ConfigError(f"judge endpoint {client.endpoint} lists no models; name one with --judge-model")
    return listed[0]


def _jobs(rows: list[dict]) -> dict[tuple, tuple[list[dict], object, str]]:
    """(row index, what) -> (messages, parser, nudge); what: "model"/"base" grades, "tuned_first"/"base_first"."""
    jobs = {}
    for i, row in enumerate(rows):
        jobs[(i, "model")] = (single_messages(row, row["answer"]), parse_grade, SINGLE_NUDGE)
        base = row.get("base_answer")
        if not isinstance(base, str):
            continue
        jobs[(i, "base")] = (single_messages(row, base), parse_grade, SINGLE_NUDGE)
        if base != row["answer"]:
            jobs[(i, "tuned_first")] = (pair_messages(row, row["answer"], base), parse_verdict, PAIR_NUDGE)
            jobs[(i, "base_first")] = (pair_messages(row, base, row["answer"]), parse_verdict, PAIR_NUDGE)
    return jobs


def _run(judge: Judge, jobs: dict, workers: int, progress: bool) -> dict[tuple, Outcome]:
    """Every job's outcome; jobs with the same messages (identical answers, repeated prompts) are asked once.
    An interrupt cancels what has not started; replies already cached stay for the next run."""
    by_key: dict[str, list[tuple]] = {}
    for job, (messages, _, _) in jobs.items():
        by_key.setdefault(cache_key(judge.model, messages), []).append(job)
    from tqdm.auto import tqdm

    outcomes = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(judge.judge, *jobs[same[0]]): same for same in by_key.values()}
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge", disable=not progress, leave=False):
            outcomes |= {job: future.result() for job in futures[future]}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def _items(rows: list[dict], outcomes: dict[tuple, Outcome]) -> list[dict]:
    """Per prompt: its grades, its two order verdicts in tuned terms, and the combined verdict."""
    items = []
    for i, row in enumerate(rows):
        item = {"source": row.get("source"), "grade": {"model": outcomes[(i, "model")].value}}
        if (i, "base") in outcomes:
            item["grade"]["base"] = outcomes[(i, "base")].value
            if (i, "tuned_first") in outcomes:
                first = _in_tuned_terms(outcomes[(i, "tuned_first")].value, tuned_is="A")
                second = _in_tuned_terms(outcomes[(i, "base_first")].value, tuned_is="B")
                item["orders"], item["verdict"] = [first, second], combine(first, second)
            else:
                item["orders"], item["verdict"] = ["tie", "tie"], "tie"  # identical answers: not asked
        items.append(item)
    return items


def _in_tuned_terms(letter: str | None, tuned_is: str) -> str | None:
    if letter is None:
        return None
    return "tie" if letter == "C" else "tuned" if letter == tuned_is else "base"


def combine(first: str | None, second: str | None) -> str | None:
    """The position-bias rule: a model wins only when both orders say so; otherwise a tie. None: missing."""
    if first is None or second is None:
        return None
    return first if first == second else "tie"


# --- summaries -----------------------------------------------------------------------------------------------


def single_summary(items: list[dict], seed: int = 0) -> dict:
    """Mean grade of each model (over its graded items), missing counts, and tuned - base over the items
    graded for both, with its 95% paired-bootstrap interval."""
    from sftlab.evaluate.significance import interval, mean_scores

    out = {"n": len(items)}
    for label in ("model", "base"):
        grades = [it["grade"][label] for it in items if label in it["grade"]]
        if grades:
            present = [g for g in grades if g is not None]
            out[label] = sum(present) / len(present) if present else None
            out[f"missing_{label}"] = len(grades) - len(present)
    both = [it["grade"] for it in items if it["grade"].get("model") is not None and it["grade"].get("base") is not None]
    if "base" in out:
        tuned, base = mean_scores([g["model"] for g in both]), mean_scores([g["base"] for g in both])
        out["paired"] = len(both)
        out["delta"] = tuned.whole() - base.whole() if both else None
        out["interval"] = interval(base, tuned, seed)
    return out


def pairwise_summary(items: list[dict], seed: int = 0) -> dict:
    """Wins, losses, ties of the tuned model, its win rate (wins + half the ties, over the judged pairs) with
    a 95% bootstrap interval over items, and how often the two orders disagreed."""
    from sftlab.evaluate.significance import interval, mean_scores

    judged = [it for it in items if it.get("verdict") is not None]
    counts = {c: sum(it["verdict"] == c for it in judged) for c in CLASSES}
    points = [{"tuned": 1.0, "tie": 0.5, "base": 0.0}[it["verdict"]] for it in judged]
    n = len(judged)
    # The interval of (win rate - 0.5) through the paired bootstrap against a coin: significant = excludes 0.5.
    iv = interval(mean_scores([0.5] * n), mean_scores(points), seed)
    shifted = [None, None] if iv["low"] is None else [iv["low"] + 0.5, iv["high"] + 0.5]
    orders = [it["orders"] for it in judged]
    return {"n": n, "wins": counts["tuned"], "losses": counts["base"], "ties": counts["tie"],
            "win_rate": sum(points) / n if n else None, "interval": shifted, "significant": iv["significant"],
            "inconsistent": sum(a != b for a, b in orders), "flips": sum({a, b} == {"tuned", "base"} for a, b in orders),
            "missing": sum(it.get("verdict") is None and "orders" in it for it in items)}  # fmt: skip


# --- agreement with `sftlab ui` ratings ----------------------------------------------------------------------


def ratings_stores(run_dir: Path) -> list[Path]:
    """Where `sftlab ui` keeps ratings of this run's samples: RUNS_DIR/ratings.sqlite for `sftlab ui RUNS_DIR`
    (the run's parent) or for `sftlab ui RUN_DIR` (the run itself); a store given with --db is not found."""
    run_dir = Path(run_dir)
    found = [p.resolve() for p in (run_dir / "ratings.sqlite", run_dir.parent / "ratings.sqlite") if p.is_file()]
    return list(dict.fromkeys(found))


def human_ratings(store: Path) -> list[tuple[str, str, str, str]]:
    """(prompt, answer_a, answer_b, preference 'a'|'b'|'tie') of every non-gold rating in a ui store."""
    uri = Path(store).resolve().as_uri() + "?mode=ro"  # percent-encoded: a path may hold '?' or '#'
    try:
        db = sqlite3.connect(uri, uri=True, timeout=30)
        try:
            return db.execute("SELECT i.prompt, i.answer_a, i.answer_b, r.preference FROM ratings r "
                              "JOIN items i ON i.id = r.item WHERE i.gold IS NULL").fetchall()  # fmt: skip
        finally:
            db.close()
    except sqlite3.Error:
        return []  # not a ui store (or an older one): no ratings to compare with


def human_agreement(stores: list[Path], rows: list[dict], items: list[dict]) -> dict | None:
    """Cohen's kappa between the judge's pairwise verdicts and human ratings of the same comparisons (same
    prompt and the same two answers, either way round), over tuned better / base better / tie. Each human
    rating is one unit, paired with the judge's verdict on its item. None when nothing was rated by both."""
    verdicts = {(r.get("prompt"), r["answer"], r["base_answer"]): it["verdict"]
                for r, it in zip(rows, items) if it.get("verdict") is not None}  # fmt: skip
    pairs, rated = [], set()
    for store in stores:
        for prompt, a, b, preference in human_ratings(store):
            if (prompt, a, b) in verdicts:  # a is the tuned answer (as `sftlab ui` lays out eval samples)
                key, human = (prompt, a, b), {"a": "tuned", "b": "base"}.get(preference, "tie")
            elif (prompt, b, a) in verdicts:
                key, human = (prompt, b, a), {"a": "base", "b": "tuned"}.get(preference, "tie")
            else:
                continue
            pairs.append((verdicts[key], human))
            rated.add(key)
    if not pairs:
        return None
    return {"kappa": cohen_kappa(pairs), "n": len(pairs), "items": len(rated),
            "observed": sum(j == h for j, h in pairs) / len(pairs)}  # fmt: skip


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """(observed - chance agreement) / (1 - chance), chance from each rater's own class frequencies; None
    when both used one class only (chance agreement 1: kappa is undefined)."""
    n = len(pairs)
    observed = sum(x == y for x, y in pairs) / n
    chance = sum(sum(x == c for x, _ in pairs) * sum(y == c for _, y in pairs) for c in CLASSES) / n**2
    return None if chance == 1 else (observed - chance) / (1 - chance)


# --- a run's eval directory ----------------------------------------------------------------------------------


def read_samples(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file; run `sftlab eval RUN_DIR --compare` first")
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{n}: not a JSON line") from None
    return rows


def judge_eval(eval_dir: Path, endpoint: str, model: str | None = None, run_dir: Path | None = None,
               **kw) -> dict:  # fmt: skip
    """judge_samples on EVAL_DIR/samples.jsonl, cached in EVAL_DIR/judge_cache.jsonl, with the ui ratings
    of `run_dir` (default: EVAL_DIR's parent, the run of a default `sftlab eval` output)."""
    eval_dir = Path(eval_dir)
    stores = ratings_stores(Path(run_dir) if run_dir else eval_dir.parent)
    return judge_samples(read_samples(eval_dir / "samples.jsonl"), endpoint, model,
                         cache=eval_dir / "judge_cache.jsonl", ratings=stores, **kw)  # fmt: skip


def format_judge(record: dict) -> str:
    """The judge's lines for the eval table (`~`: not significant at 95%)."""
    j, s, p, a = record["judge"], record["single"], record["pairwise"], record["agreement"]
    head = (f"judge {j['model']} at {j['endpoint']} ({j['template']}): {j['requests']} requests, {j['cached']} "
            f"cached, {j['failed']} failed, {j['unparsed']} unparseable")  # fmt: skip
    lines = [head]
    line = f"judge grade (1-10)   tuned {_num(s.get('model'))}"
    missing = f"missing {s['missing_model']}"
    if "base" in s:
        line += f"  base {_num(s['base'])}  delta {_num(s['delta'], '+.2f')} {_bounds(s['interval'], '+.2f')}"
        missing += f" tuned, {s['missing_base']} base"
    lines.append(f"{line}  (n={s['n']}, {missing})")
    if p:
        iv = {"low": p["interval"][0], "high": p["interval"][1], "significant": p["significant"]}
        lines.append(f"judge pairwise       tuned wins {p['wins']}, base wins {p['losses']}, ties {p['ties']}: "
                     f"win rate {_num(p['win_rate'], '.3f')} {_bounds(iv, '.3f')}  ({p['inconsistent']} of "
                     f"{p['n']} inconsistent across the two orders, {p['missing']} missing)")  # fmt: skip
    if a:
        kappa = "undefined (one class only)" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(f"judge-human agreement  Cohen's kappa {kappa} over {a['n']} ratings of {a['items']} prompts "
                     f"(raw agreement {a['observed']:.0%})")  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _bounds(iv: dict, spec: str) -> str:
    if iv.get("low") is None:
        return ""
    return f"[{format(iv['low'], spec)}, {format(iv['high'], spec)}]{'' if iv['significant'] else ' ~'}"
