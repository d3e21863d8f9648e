"""`sftlab ui`: the runs dashboard and blind side-by-side rating, one FastAPI app with plain HTML/JS.

Safety, in two middlewares: `guard` asks for a token when the app is reachable from other machines,
checks the Host against DNS rebinding when it is not, takes JSON-only POSTs (no cross-site form
posts) and sets a Content-Security-Policy that runs no inline script; `BodyLimit` caps request bodies. Pages put every string from a
run, a model or an annotator into the DOM as text (textContent), never as HTML.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

from fastapi import Request
from pydantic import BaseModel, Field

from sftlab.auth import bearer, is_loopback_host, same_secret
from sftlab.ui import runs as run_info
from sftlab.ui import stats
from sftlab.ui.store import SCORE_COLUMNS, Pair, Store, UiError
from sftlab.ui.studies import sync_studies

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/run": "run.html", "/rate": "rate.html", "/results": "results.html"}
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
COOKIE = "sftlab_ui_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")  # fmt: skip
# The HTML report is self-contained (inline style, data-URI charts); its one inline script is optional.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


@dataclass
class Settings:
    runs_dir: Path
    db: Path
    compare: list[Path] = field(default_factory=list)
    gold: list[Pair] = field(default_factory=list)
    token: str | None = None  # required on every request when set
    max_body: int = 64 * 1024


class Scores(BaseModel):
    helpfulness: int = Field(ge=1, le=5)
    accuracy: int = Field(ge=1, le=5)
    fluency: int = Field(ge=1, le=5)
    harmlessness: int = Field(ge=1, le=5)


class RatingBody(BaseModel):
    annotator: str = Field(min_length=1, max_length=64)
    item: int
    preference: Literal["left", "right", "tie"]
    left: Scores
    right: Scores
    seconds: float | None = Field(None, ge=0, le=86_400)


def create_app(settings: Settings):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    store = Store(settings.db)
    problems = sync_studies(store, settings.runs_dir, settings.compare, settings.gold)
    app = FastAPI(title="sftlab ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(guard(settings))
    app.add_middleware(BodyLimit, limit=settings.max_body)  # outermost: runs before the guard reads anything

    @app.exception_handler(UiError)
    async def ui_error(_, exc: UiError):
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def schema_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    for router in (page_routes(), run_routes(settings.runs_dir), study_routes(store, settings, problems)):
        app.include_router(router)
    return app


def page_routes():
    from fastapi import APIRouter
    from fastapi.responses import FileResponse

    router = APIRouter()

    def page(file: Path):
        return lambda: FileResponse(file, media_type="text/html")  # no parameters: FastAPI would read them from the query

    for path, name in PAGES.items():
        router.add_api_route(path, page(STATIC / name), include_in_schema=False)

    @router.get("/static/{name}")
    def asset(name: str):
        if name not in ASSETS:  # a fixed list: no request path ever reaches the file system
            raise UiError(404, "no such asset")
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    return router


def run_routes(runs_dir: Path):
    from fastapi import APIRouter
    from fastapi.responses import FileResponse

    router = APIRouter()

    def known_run(name: str) -> Path:
        found = run_info.find_runs(runs_dir)
        if name not in found:
            raise UiError(404, f"no run named {name!r} under {runs_dir}")
        return found[name]

    @router.get("/api/runs")
    def list_runs():
        return [run_info.overview(name, path) for name, path in run_info.find_runs(runs_dir).items()]

    @router.get("/api/runs/{name}")
    def run_details(name: str):
        return run_info.details(name, known_run(name))

    @router.get("/api/runs/{name}/metrics")
    def run_metrics(name: str, offset: int = 0):
        rows, next_offset, reset = run_info.read_metrics_from(known_run(name) / "metrics.jsonl", max(0, offset))
        return {"rows": rows, "next": next_offset, "reset": reset}

    @router.get("/runs/{name}/report")
    def run_report(name: str):
        path = run_info.run_file(run_info.find_runs(runs_dir), name, "report.html")
        if path is None:
            raise UiError(404, f"run {name!r} has no report.html; run `sftlab report` on it")
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_CSP})

    return router


def study_routes(store: Store, settings: Settings, problems: list[str]):
    from fastapi import APIRouter
    from fastapi.responses import Response

    router = APIRouter()

    @router.get("/api/studies")
    def list_studies():  # re-read: an eval --compare that finished since shows up without a restart
        problems[:] = sync_studies(store, settings.runs_dir, settings.compare, settings.gold)
        return {"studies": store.studies(), "problems": problems}

    @router.get("/api/studies/{study}/next")
    def next_item(study: str, annotator: str):
        return store.next_item(study, check_name(annotator))

    @router.post("/api/studies/{study}/ratings")
    def rate(study: str, body: RatingBody):
        store.study(study)
        name = check_name(body.annotator)
        scores = {"left": body.left.model_dump(), "right": body.right.model_dump()}
        store.rate(study, name, body.item, body.preference, scores, body.seconds)
        return store.next_item(study, name)

    @router.get("/api/studies/{study}/results")
    def study_results(study: str, exclude_flagged: bool = False):
        return {"study": store.study(study), **stats.results(store.ratings(study), exclude_flagged)}

    @router.get("/api/studies/{study}/export.json")
    def export_json(study: str):
        info = store.study(study)
        body = json.dumps({"study": info, "ratings": export_rows(info, store.ratings(study))}, ensure_ascii=False)
        return Response(body, media_type="application/json", headers=_download(f"{study}.json"))

    @router.get("/api/studies/{study}/export.csv")
    def export_csv(study: str):
        rows = export_rows(store.study(study), store.ratings(study))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["study"])
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=_download(f"{study}.csv"))

    return router


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message}}, status_code=status)


def check_name(annotator: str) -> str:
    name = annotator.strip()
    if not 1 <= len(name) <= 64 or any(not c.isprintable() for c in name):
        raise UiError(400, "annotator: a name of 1-64 printable characters")
    return name


def export_rows(study: dict, ratings: list[dict]) -> list[dict]:
    """Ratings unblinded: which model was shown left, which one won, and each model's scores."""
    names = {"a": study["model_a"], "b": study["model_b"], "tie": "tie"}
    rows = []
    for r in ratings:
        left, right = ("a", "b") if r["left_is_a"] else ("b", "a")
        rows.append({"study": r["study"], "item": r["position"], "annotator": r["annotator"],
                     "gold": r["gold"] is not None, "gold_correct": None if r["gold"] is None else r["preference"] == r["gold"],
                     "prompt": r["prompt"], "model_a": study["model_a"], "model_b": study["model_b"],
                     "answer_a": r["answer_a"], "answer_b": r["answer_b"], "shown_left": names[left],
                     "shown_right": names[right], "preferred": names[r["preference"]], "preference": r["preference"],
                     **{c: r[c] for c in SCORE_COLUMNS}, "seconds": r["seconds"],
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created"]))})  # fmt: skip
    return rows


def _cell(value):
    # A cell starting with = + - @ is a formula to a spreadsheet; model text must never run as one.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _download(filename: str) -> dict:
    return {"Content-Disposition": f'attachment; filename="{filename}"'}


def guard(settings: Settings):
    from fastapi.responses import RedirectResponse

    async def middleware(request: Request, call_next):
        if settings.token is None:
            if not is_loopback_host(request.url.hostname):  # DNS rebinding: a foreign name for 127.0.0.1
                return _error(400, "this server answers only to localhost/127.0.0.1")
        else:
            query = request.query_params.get("token")
            if query is not None and request.method == "GET" and same_secret(query, settings.token):
                # The printed link carries the token once; a cookie carries it from then on, out of the URL.
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                # One leading slash: "//host" would send the browser to another site.
                target = "/" + request.url.path.lstrip("/") + (f"?{rest}" if rest else "")
                response = RedirectResponse(target, status_code=303)
                response.set_cookie(COOKIE, settings.token, httponly=True, samesite="strict")
                return response
            given = request.cookies.get(COOKIE) or bearer(request.headers.get("authorization", ""))
            if not same_secret(given, settings.token):
                return _error(401, "a token is required: open the link `sftlab ui` printed (it ends in ?token=...)")
        if request.method == "POST":
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return _error(415, "send JSON (Content-Type: application/json)")
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    return middleware


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before any handler reads it,
    whether its size was declared (Content-Length) or streamed in chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.limit} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
