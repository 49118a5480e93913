"""The REST API (FastAPI) and `serve`, which runs it next to one worker process per device.

Routes (docs/guide.md): jobs are submitted, listed, read, cancelled, followed
as server-sent events, and their results read as a Pareto front or downloaded as a tar of
a HF model folder; benchmarks are uploaded as JSONL; /healthz, /metrics and the page
/jobs/{id} complete it. Jobs only enter the queue here; workers (service.worker) run them.

When tokens are configured every route but /healthz needs `Authorization: Bearer TOKEN`
(GET requests may carry it in the `evomerge_token` cookie instead, which the page sets when
opened with `?token=...`, since a browser cannot add headers to a link). A job is visible
only to the user who submitted it, or to an admin. Errors are JSON `{"detail": "..."}`
one-liners; spec errors add `"field"`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import subprocess
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool

from .config import Settings, User
from .schemas import KINDS, SpecError, check_spec, field_name, parse_spec, spec_json
from .store import STATES, TERMINAL, BenchmarkRow, Job, Store

COOKIE = "evomerge_token"
BENCHMARK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: no trailing newline
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class ApiError(HTTPException):
    """An HTTP error with a one-line message and, for spec errors, the offending field."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict | None = None):
        super().__init__(status, detail, headers)
        self.field = field


class RateLimiter:
    """At most `per_minute` events per key in any sliding 60-second window."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._hits: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and now - hits[0] > 60:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = int(60 - (now - hits[0])) + 1
                raise ApiError(429, f"too many submissions: at most {self.per_minute} a minute",
                               headers={"Retry-After": str(retry)})
            hits.append(now)


class Exports:
    """Builds checkpoint tars in background threads: one build per (job, candidate) at a time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._building: set[tuple[str, int]] = set()
        self._errors: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def start(self, job: Job, cid: int) -> str | None:
        """Starts (or keeps) a build; returns the error of a failed previous build, once."""
        from .worker import build_checkpoint_tar, one_line

        key = (job.id, cid)
        with self._lock:
            if key in self._errors:
                return self._errors.pop(key)
            if key in self._building:
                return None
            self._building.add(key)

        def build():
            try:
                build_checkpoint_tar(self.settings, job, cid)
            except Exception as e:
                with self._lock:
                    self._errors[key] = one_line(e)
            finally:
                with self._lock:
                    self._building.discard(key)

        threading.Thread(target=build, name=f"export-{job.id}-{cid}", daemon=True).start()
        return None


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 past `limit` bytes (checked as it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body: {what} larger than the limit of {limit} bytes", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: {what} larger than the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; 422 naming `body` for anything else, NaN and infinities included."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")
    try:
        return json.loads(raw or b"null", parse_constant=no_constant)
    except RecursionError:
        raise ApiError(422, "body: nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"body: not valid JSON ({str(e).splitlines()[0]})", "body") from None


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API over `settings` (default: from the environment)."""
    settings = settings or Settings.from_env()
    store = store or Store(settings.database_url)
    limiter = RateLimiter(settings.rate_limit_per_minute)
    exports = Exports(settings)
    docs = {} if not settings.auth else {"openapi_url": None, "docs_url": None, "redoc_url": None}  # all or nothing
    app = FastAPI(title="evomerge", version="0.1.0", summary="Evolutionary model merging as a service", **docs)
    app.state.settings, app.state.store = settings, store
    _document_job_spec(app)

    # -- errors: one line of JSON each ----------------------------------------------------
    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        body: dict[str, Any] = {"detail": e.detail}
        if getattr(e, "field", None):
            body["field"] = e.field
        return JSONResponse(body, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(SpecError)
    async def _spec_error(request: Request, e: SpecError):
        return JSONResponse({"detail": str(e), "field": e.field}, e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [p for p in err["loc"] if p not in ("query", "path", "body", "header")]
        field = field_name(loc) or "request"
        msg = str(err["msg"]).removeprefix("Value error, ")
        return JSONResponse({"detail": f"{field}: {msg}", "field": field}, 422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        from .worker import one_line
        return JSONResponse({"detail": f"internal error: {one_line(e)}"}, 500)

    # -- who is calling ---------------------------------------------------------------------
    def user_of(request: Request) -> User | None:
        """The caller (None when auth is off); 401 without a known token."""
        if not settings.auth:
            return None
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        if token is None and request.method in ("GET", "HEAD"):
            token = request.cookies.get(COOKIE) or None
        if not token:
            raise ApiError(401, "authorization: a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        return known_user(token)

    def known_user(token: str) -> User:
        found = None
        for known, user in settings.tokens.items():  # compare every token in constant time
            if hmac.compare_digest(known.encode(), token.encode()):
                found = user
        if found is None:
            raise ApiError(401, "authorization: unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def owner_of(user: User | None) -> str | None:
        return user.name if user else None

    def sees_all(user: User | None) -> bool:
        return user is None or user.admin

    def visible_job(job_id: str, user: User | None) -> Job:
        job = store.get_job(job_id)
        if job is None or not (sees_all(user) or job.owner == user.name):
            raise ApiError(404, f"no job {job_id}")
        return job

    def uploaded_benchmark(name: str, user: User | None) -> Path | None:
        row = store.get_benchmark(name)
        return Path(row.path) if row is not None and (sees_all(user) or row.owner == user.name) else None

    # -- jobs -------------------------------------------------------------------------------
    @app.post("/v1/jobs", status_code=201, summary="Submit a job (the spec as JSON)", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/JobSpec"}}}}})
    async def submit(request: Request):
        user = user_of(request)
        limiter.check(owner_of(user) or (request.client.host if request.client else "-"))
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media not in ("application/json", "text/json") and not media.endswith("+json"):
            raise ApiError(415, f"content-type: a job spec is sent as application/json, not {media}", "content-type")
        raw = await read_body(request, settings.max_body_bytes, "a job spec")
        spec = parse_spec(parse_json(raw))
        spec = await run_in_threadpool(check_spec, spec, settings.model_roots, settings.devices,
                                       lambda name: uploaded_benchmark(name, user), [settings.artifacts],
                                       gpu_memory=settings.gpu_memory, host_memory=settings.host_memory)
        job = store.add_job(spec.kind, spec_json(spec), spec.device, owner_of(user))
        return JSONResponse(job.to_json(), 201, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", summary="List jobs, newest first")
    def list_jobs(request: Request, status: str | None = None, limit: int = 50, offset: int = 0):
        user = user_of(request)
        if status is not None and status not in STATES:
            raise ApiError(422, f"status: must be one of {', '.join(STATES)}", "status")
        if not 1 <= limit <= 500:
            raise ApiError(422, "limit: must be between 1 and 500", "limit")
        if not 0 <= offset <= 2**62:
            raise ApiError(422, "offset: must be between 0 and 2^62", "offset")
        jobs, total = store.list_jobs(None if sees_all(user) else user.name, status, limit, offset)
        return {"jobs": [_summary(j) for j in jobs], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/jobs/{job_id}", summary="One job: status, progress, spec, result")
    def get_job(job_id: str, request: Request):
        return visible_job(job_id, user_of(request)).to_json()

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a job (queued: at once; running: at the next check)")
    def cancel_job(job_id: str, request: Request):
        job = visible_job(job_id, user_of(request))
        if job.status in ("succeeded", "failed"):
            raise ApiError(409, f"job {job_id} has already {job.status}")
        status = store.cancel(job_id)
        return {"id": job_id, "status": status, "cancel_requested": True}

    @app.get("/v1/jobs/{job_id}/events", summary="Progress as server-sent events, until the job ends")
    async def events(job_id: str, request: Request):
        visible_job(job_id, user_of(request))
        last = request.headers.get("last-event-id", "0")
        after = min(int(last), 2**62) if last.isdigit() else 0
        poll = min(settings.poll_seconds, 0.5)

        async def stream():
            nonlocal after
            idle = 0.0
            yield "retry: 2000\n\n"
            while True:
                batch = await run_in_threadpool(store.events_after, job_id, after)
                for ev in batch:
                    after = ev.id
                    yield f"id: {ev.id}\nevent: {ev.type}\ndata: {json.dumps(ev.data)}\n\n"
                if batch:
                    idle = 0.0
                    continue
                job = await run_in_threadpool(store.get_job, job_id)
                if job is None or job.status in TERMINAL:
                    if not await run_in_threadpool(store.events_after, job_id, after):
                        status = job.status if job else "gone"
                        yield f"event: end\ndata: {json.dumps({'type': 'end', 'status': status})}\n\n"
                        return
                    continue
                if await request.is_disconnected():
                    return
                idle += poll
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/front", summary="The result's Pareto front (a merge: its one candidate, id 0)")
    def front(job_id: str, request: Request):
        job = visible_job(job_id, user_of(request))
        cands = [c.to_json() for c in store.candidates(job_id)]
        if not cands and job.kind == "evolve" and job.status not in TERMINAL:
            cands = _live_candidates(settings.job_dir(job.id) / "search")
        result = job.result or {}
        names = result.get("objectives") or sorted({k for c in cands for k in c["objectives"]})
        return {"job_id": job.id, "kind": job.kind, "status": job.status, "objectives": names,
                "senses": result.get("senses") or {}, "knee": result.get("knee"),
                "hypervolume": result.get("hypervolume"), "true_hypervolume": result.get("true_hypervolume"),
                "candidates": cands}

    @app.get("/v1/jobs/{job_id}/candidates/{cid}/checkpoint",
             summary="A candidate as a tar of a HF model folder (202 + Retry-After while it is built)")
    def checkpoint(job_id: str, cid: int, request: Request):
        job = visible_job(job_id, user_of(request))
        if not 0 <= cid <= 2**62 or store.candidate(job_id, cid) is None:
            hint = "" if job.status == "succeeded" else f" (the job is {job.status})"
            raise ApiError(404, f"job {job_id} has no candidate {cid}{hint}")
        tar = settings.job_dir(job_id) / "exports" / f"{cid}.tar"
        if tar.is_file():
            return FileResponse(tar, media_type="application/x-tar", filename=f"{job_id}-{cid}.tar")
        error = exports.start(job, cid)
        if error:
            raise ApiError(500, f"building the checkpoint failed: {error}")
        return JSONResponse({"detail": "the checkpoint is being built; retry shortly"}, 202,
                            headers={"Retry-After": "2"})

    # -- benchmarks -------------------------------------------------------------------------
    @app.post("/v1/benchmarks", status_code=201, summary="Upload a benchmark: the body is JSONL items")
    async def upload_benchmark(request: Request, name: str):
        from data.benchmarks import BenchmarkError, content_hash, parse_items

        user = user_of(request)
        if not BENCHMARK_NAME.fullmatch(name):
            raise ApiError(422, "name: letters, digits, '_', '.', '-' only (at most 128)", "name")
        existing = store.get_benchmark(name)
        if existing is not None and not (sees_all(user) or existing.owner == user.name):
            raise ApiError(409, f"name: benchmark {name!r} belongs to another user", "name")
        raw = await read_body(request, settings.max_benchmark_bytes, "the benchmark")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(422, f"body: not UTF-8 text ({e.reason} at byte {e.start})", "body") from None
        try:
            items = parse_items(text.splitlines(), source=name)
        except BenchmarkError as e:
            m = re.match(rf"{re.escape(name)}:(\d+): ", str(e))
            raise ApiError(422, f"line {m.group(1)}: {str(e)[m.end():]}" if m else str(e),
                           f"line {m.group(1)}" if m else "body") from None
        digest = content_hash(items)
        path = settings.benchmark_dir / f"{name}-{hashlib.sha256(raw).hexdigest()[:16]}.jsonl"
        await run_in_threadpool(_atomic_write, path, raw)
        row = BenchmarkRow(name=name, owner=owner_of(user), path=str(path.absolute()), items=len(items),
                           hash=digest, bytes=len(raw), created_at=time.time())
        store.put_benchmark(row)
        return JSONResponse(row.to_json(), 201)

    @app.get("/v1/benchmarks", summary="Uploaded benchmarks")
    def list_benchmarks(request: Request):
        user = user_of(request)
        rows = [b for b in store.list_benchmarks() if sees_all(user) or b.owner == user.name]
        return {"benchmarks": [b.to_json() for b in rows]}

    # -- operations -------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness and database reachability (no auth)")
    def healthz():
        try:
            store.counts_by_status()
        except Exception:
            return JSONResponse({"status": "unavailable", "detail": "the job store is not reachable"}, 503)
        return {"status": "ok", "kinds": list(KINDS)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics(request: Request):
        user_of(request)
        return PlainTextResponse(_metrics(store), media_type="text/plain; version=0.0.4")

    # -- the page ---------------------------------------------------------------------------
    @app.get("/jobs/{job_id}", response_class=HTMLResponse, summary="The job's page: progress and Pareto front")
    def page(job_id: str, request: Request, token: str | None = None):
        from .page import error_page, job_page

        try:
            if token is not None:  # move the token into a cookie and off the address bar
                resp = RedirectResponse(f"/jobs/{quote(job_id, safe='')}", 303)
                if settings.auth:
                    known_user(token)
                    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
                return resp
            visible_job(job_id, user_of(request))
        except ApiError as e:  # a person reads this one: a page, not JSON
            hint = " Open the page as /jobs/ID?token=YOUR_TOKEN." if e.status_code == 401 else ""
            return HTMLResponse(error_page(e.status_code, f"{e.detail}.{hint}"), e.status_code, headers=e.headers)
        return HTMLResponse(job_page(job_id))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    return app


def _document_job_spec(app: FastAPI) -> None:
    """Puts the job spec's JSON schema into the OpenAPI document (the route reads the raw body
    itself, to answer size limits and errors its own way, so FastAPI cannot infer it)."""
    from pydantic import TypeAdapter

    from .schemas import JobSpec

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = default_openapi()
            schema = TypeAdapter(JobSpec).json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components["JobSpec"] = schema
        return app.openapi_schema

    app.openapi = openapi


def _live_candidates(run_dir: Path) -> list[dict[str, Any]]:
    """A running search's candidates so far (its candidates.jsonl, written as they are scored):
    estimated objectives only; the front and true objectives come when the job ends."""
    from evolve.search import CANDIDATES_FILE, read_candidates

    return [{"id": c.id, "params": c.params, "objectives": c.objectives, "true_objectives": None, "on_front": False}
            for c in read_candidates(run_dir / CANDIDATES_FILE)]


def _summary(job: Job) -> dict[str, Any]:
    d = job.to_json()
    d.pop("spec")
    return d


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _metrics(store: Store) -> str:
    """Prometheus text format, computed from the store so it covers every worker."""
    counts = store.counts_by_status()
    lines = ["# HELP evomerge_queue_depth Jobs waiting for a worker.", "# TYPE evomerge_queue_depth gauge",
             f"evomerge_queue_depth {counts['queued']}",
             "# HELP evomerge_jobs Jobs by state.", "# TYPE evomerge_jobs gauge"]
    lines += [f'evomerge_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
    lines += ["# HELP evomerge_evaluations_total Candidate evaluations reported by all jobs.",
              "# TYPE evomerge_evaluations_total counter", f"evomerge_evaluations_total {store.total_evaluations()}",
              "# HELP evomerge_job_duration_seconds Run time of finished jobs.",
              "# TYPE evomerge_job_duration_seconds histogram"]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, seconds in store.durations():
        by_kind[kind].append(seconds)
    for kind, values in sorted(by_kind.items()):
        for b in DURATION_BUCKETS:
            lines.append(f'evomerge_job_duration_seconds_bucket{{kind="{kind}",le="{b}"}} '
                         f"{sum(v <= b for v in values)}")
        lines.append(f'evomerge_job_duration_seconds_bucket{{kind="{kind}",le="+Inf"}} {len(values)}')
        lines.append(f'evomerge_job_duration_seconds_sum{{kind="{kind}"}} {sum(values):.3f}')
        lines.append(f'evomerge_job_duration_seconds_count{{kind="{kind}"}} {len(values)}')
    return "\n".join(lines) + "\n"


# -- serve: the API plus one worker process per device ---------------------------------------

def default_devices() -> list[str]:
    """Every visible GPU, or the CPU when there is none."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(n)] or ["cpu"]


def start_workers(settings: Settings, devices: list[str]) -> list[subprocess.Popen]:
    from .worker import worker_command

    return [subprocess.Popen(worker_command(settings, d, parent_pid=os.getpid())) for d in devices]


def stop_processes(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM (a worker requeues its running job), then SIGKILL whoever is still there."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def serve(host: str = "127.0.0.1", port: int = 8000, db_url: str | None = None,
          artifacts: str | os.PathLike | None = None, model_roots: list[str | os.PathLike] | None = None,
          devices: list[str] | None = None, settings: Settings | None = None) -> None:
    """Runs the API with uvicorn until SIGINT/SIGTERM, plus a worker process per device.

    `devices=None` means every GPU (or the CPU); `devices=[]` runs the API alone, for
    setups whose workers run elsewhere (`evomerge worker`) against a shared database."""
    import uvicorn

    devices = default_devices() if devices is None else list(devices)
    settings = (settings or Settings.from_env()).with_(
        db_url=db_url, artifacts=Path(artifacts) if artifacts else None,
        model_roots=tuple(Path(p) for p in model_roots) if model_roots else None,
        devices=tuple(devices) if devices else None)
    store = Store(settings.database_url)  # creates the schema before the workers start
    procs = start_workers(settings, devices)
    try:
        uvicorn.run(create_app(settings, store), host=host, port=port, log_level="info")
    finally:
        stop_processes(procs)
        store.close()


class BackgroundServer:
    """The API served by uvicorn in a thread of this process, on a free loopback port.

    For tests and notebooks: `with BackgroundServer(settings) as url: ...` (no workers;
    start those with `service.worker`)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.app.state.store.close()


def app_from_env() -> FastAPI:
    """For `uvicorn --factory service.app:app_from_env` (the API alone, settings from EVOMERGE_*)."""
    return create_app(Settings.from_env())

