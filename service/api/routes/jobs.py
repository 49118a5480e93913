"""Job routes: submit, list, read and cancel jobs, follow one as server-sent events, read its
result as a Pareto front and download a candidate as a tar of a HF model folder.

Jobs only enter the queue here; workers (`service.worker`) run them. A submitted spec is
parsed and checked against this server's view of the world (`service.schemas`) before it
is stored, so a job in the queue is one that can run.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.api.body import parse_json, read_body
from service.api.deps import (
    ExportsDep,
    SettingsDep,
    StoreDep,
    UserDep,
    VisibleJob,
    owner_of,
    rate_key,
    sees_all,
    uploaded_benchmark,
)
from service.api.models import (
    RETRY_AFTER,
    Cancelled,
    CandidateOut,
    FrontOut,
    JobList,
    JobOut,
    JobSummary,
    Pending,
    Status,
    json_body,
    links,
    refusals,
)
from service.errors import ApiError
from service.schemas import check_spec, parse_spec, spec_json
from service.store import TERMINAL

router = APIRouter()


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


class Tar(FileResponse):
    media_type = "application/x-tar"


@router.post("/v1/jobs", status_code=201, response_model=JobOut, summary="Submit a job (the spec as JSON)",
             responses=refusals(400, 413, 415, 422, 429) | {201: {
                 "description": "Accepted and queued", "headers": {"Location": {
                     "description": "the job's URL", "schema": {"type": "string"}}},
                 "links": links("job_id", "$response.body#/id", "get_job", "cancel_job", "front", "candidates")}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/JobSpec"}}}}})
async def submit(request: Request, response: Response, user: UserDep, settings: SettingsDep, store: StoreDep):
    limiter, key = request.app.state.limiter, rate_key(request, user)
    slot = limiter.take(key)
    try:
        job = await _accept(request, user, settings, store)
    except BaseException:
        limiter.give_back(key, slot)
        raise
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


async def _accept(request: Request, user, settings, store):
    """The checked spec of the request, queued as a job."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media not in ("application/json", "text/json") and not media.endswith("+json"):
        raise ApiError(415, f"content-type: a job spec is sent as application/json, not {media}", "content-type")
    raw = await read_body(request, settings.max_body_bytes, "a job spec")
    spec = parse_spec(parse_json(raw))
    spec = await run_in_threadpool(check_spec, spec, settings.model_roots, settings.devices,
                                   lambda name: uploaded_benchmark(store, user, name), [settings.artifacts],
                                   gpu_memory=settings.gpu_memory, host_memory=settings.host_memory)
    return store.add_job(spec.kind, spec_json(spec), spec.device, owner_of(user))


@router.get("/v1/jobs", response_model=JobList, summary="List jobs, newest first", responses=refusals(422))
def list_jobs(user: UserDep, store: StoreDep, status: Status | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0, le=2**62)] = 0):
    jobs, total = store.list_jobs(None if sees_all(user) else user.name, status, limit, offset)
    return JobList(jobs=[JobSummary.of(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, summary="One job: status, progress, spec, result",
            responses=refusals(404))
def get_job(job: VisibleJob):
    return JobOut.of(job)


@router.delete("/v1/jobs/{job_id}", response_model=Cancelled,
               summary="Cancel a job (queued: at once; running: at the next check)", responses=refusals(404, 409))
def cancel_job(job: VisibleJob, store: StoreDep):
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, f"job {job.id} has already {job.status}")
    return Cancelled(id=job.id, status=store.cancel(job.id), cancel_requested=True)


@router.get("/v1/jobs/{job_id}/events", summary="Progress as server-sent events, until the job ends",
            response_class=EventStream, responses=refusals(404) | {200: {
                "description": "`id:`, `event:` (the type: status, stage, progress, irt, done, ...; `end` last) and "
                               "`data:` (the event as JSON) per event; resumes after the `Last-Event-ID` header",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def events(request: Request, job: VisibleJob, settings: SettingsDep, store: StoreDep):
    last = request.headers.get("last-event-id", "0")
    after = min(int(last), 2**62) if last.isdigit() else 0
    poll = min(settings.poll_seconds, 0.5)
    job_id = job.id

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
            current = await run_in_threadpool(store.get_job, job_id)
            if current is None or current.status in TERMINAL:
                if not await run_in_threadpool(store.events_after, job_id, after):
                    status = current.status if current else "gone"
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

    return EventStream(stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/jobs/{job_id}/front", response_model=FrontOut,
            summary="The result's Pareto front (a merge: its one candidate, id 0)", responses=refusals(404))
def front(job: VisibleJob, settings: SettingsDep, store: StoreDep):
    return _result(job, settings, store, front_only=True)


@router.get("/v1/jobs/{job_id}/candidates", response_model=FrontOut,
            summary="Every candidate scored, the front's marked on_front (while a search runs: those so far)",
            responses=refusals(404))
def candidates(job: VisibleJob, settings: SettingsDep, store: StoreDep):
    return _result(job, settings, store, front_only=False)


def _result(job, settings, store, front_only: bool) -> FrontOut:
    cands = [CandidateOut.of(c) for c in store.candidates(job.id) if c.on_front or not front_only]
    if not cands and job.kind == "evolve" and job.status not in TERMINAL:
        cands = live_candidates(settings.job_dir(job.id) / "search")
    result = job.result or {}
    names = result.get("objectives") or list(dict.fromkeys(k for c in cands for k in c.objectives))  # the spec's order
    return FrontOut(job_id=job.id, kind=job.kind, status=job.status, objectives=names,
                    senses=result.get("senses") or {}, knee=result.get("knee"), hypervolume=result.get("hypervolume"),
                    true_hypervolume=result.get("true_hypervolume"), candidates=cands)


def live_candidates(run_dir: Path) -> list[CandidateOut]:
    """A running search's candidates so far (its candidates.jsonl, written as they are scored):
    estimated objectives only; the front and true objectives come when the job ends."""
    from evolve.search import CANDIDATES_FILE, read_candidates

    return [CandidateOut(id=c.id, params=c.params, objectives=c.objectives, true_objectives=None, on_front=False,
                         sd=c.sd) for c in read_candidates(run_dir / CANDIDATES_FILE)]


@router.get("/v1/jobs/{job_id}/candidates/{cid}/checkpoint",
            summary="A candidate as a tar of a HF model folder (202 + Retry-After while it is built)",
            response_class=Tar, responses=refusals(404, 422, 500) | {
                200: {"description": "The tar", "content": {"application/x-tar": {
                    "schema": {"type": "string", "format": "binary"}}}},
                202: {"content": json_body(Pending), "headers": RETRY_AFTER, "description": "Being built; retry"}})
def checkpoint(cid: Annotated[int, PathParam(ge=0, le=2**62)], job: VisibleJob, settings: SettingsDep, store: StoreDep, exports: ExportsDep):
    if store.candidate(job.id, cid) is None:
        hint = "" if job.status == "succeeded" else f" (the job is {job.status})"
        raise ApiError(404, f"job {job.id} has no candidate {cid}{hint}")
    tar = settings.job_dir(job.id) / "exports" / f"{cid}.tar"
    if tar.is_file():
        return Tar(tar, filename=f"{job.id}-{cid}.tar")
    error = exports.start(job, cid)
    if error:
        raise ApiError(500, f"building the checkpoint failed: {error}")
    return JSONResponse({"detail": "the checkpoint is being built; retry shortly"}, 202, headers={"Retry-After": "2"})


class Yaml(Response):
    media_type = "application/yaml"


@router.get("/v1/jobs/{job_id}/candidates/{cid}/mergekit.yaml",
            summary="A candidate as a mergekit config that reproduces it (the shared methods only)",
            response_class=Yaml, responses=refusals(404, 422) | {200: {
                "description": "mergekit's YAML", "content": {"application/yaml": {"schema": {"type": "string"}}}}})
def mergekit_yaml(cid: Annotated[int, PathParam(ge=0, le=2**62)], job: VisibleJob, settings: SettingsDep,
                  store: StoreDep):
    import yaml

    if store.candidate(job.id, cid) is None:
        hint = "" if job.status == "succeeded" else f" (the job is {job.status})"
        raise ApiError(404, f"job {job.id} has no candidate {cid}{hint}")
    try:
        config = mergekit_config(job, cid, settings)
    except ValueError as e:
        raise ApiError(404, f"candidate {cid} of job {job.id} has no mergekit form: {e}") from None
    return Yaml(yaml.safe_dump(config, sort_keys=False),
                headers={"Content-Disposition": f'attachment; filename="{job.id}-{cid}.mergekit.yaml"'})


def mergekit_config(job, cid: int, settings) -> dict:
    """The mergekit config of a job's candidate: an evolve job's from its genome, a merge job's
    from its parameters, a mergekit job's own."""
    spec = parse_spec(job.spec)
    if job.kind == "mergekit":
        return spec.model_dump(mode="json", exclude={"kind", "device"}, exclude_none=True)
    if job.kind == "evolve":
        from evolve.run import export_mergekit

        return export_mergekit(settings.job_dir(job.id) / "search", cid)
    from merging.mergekit import base_layout, to_mergekit
    from merging.methods import get_method

    if get_method(spec.method).kind != "tensor":
        raise ValueError(f"method {spec.method} has no mergekit counterpart")
    names, _, floating = base_layout(spec.base)
    params = spec.method_params()
    return to_mergekit(spec, lambda name: params, names, floating)
