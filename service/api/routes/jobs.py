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

from fastapi import APIRouter, Depends, Request, Response
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
    rate_limit,
    sees_all,
    uploaded_benchmark,
)
from service.api.models import Cancelled, CandidateOut, FrontOut, JobList, JobOut, JobSummary
from service.errors import ApiError
from service.schemas import check_spec, parse_spec, spec_json
from service.store import STATES, TERMINAL

router = APIRouter()


@router.post("/v1/jobs", status_code=201, response_model=JobOut, summary="Submit a job (the spec as JSON)",
             dependencies=[Depends(rate_limit)], openapi_extra={
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/JobSpec"}}}}})
async def submit(request: Request, response: Response, user: UserDep, settings: SettingsDep, store: StoreDep):
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media not in ("application/json", "text/json") and not media.endswith("+json"):
        raise ApiError(415, f"content-type: a job spec is sent as application/json, not {media}", "content-type")
    raw = await read_body(request, settings.max_body_bytes, "a job spec")
    spec = parse_spec(parse_json(raw))
    spec = await run_in_threadpool(check_spec, spec, settings.model_roots, settings.devices,
                                   lambda name: uploaded_benchmark(store, user, name), [settings.artifacts],
                                   gpu_memory=settings.gpu_memory, host_memory=settings.host_memory)
    job = store.add_job(spec.kind, spec_json(spec), spec.device, owner_of(user))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("/v1/jobs", response_model=JobList, summary="List jobs, newest first")
def list_jobs(user: UserDep, store: StoreDep, status: str | None = None, limit: int = 50, offset: int = 0):
    if status is not None and status not in STATES:
        raise ApiError(422, f"status: must be one of {', '.join(STATES)}", "status")
    if not 1 <= limit <= 500:
        raise ApiError(422, "limit: must be between 1 and 500", "limit")
    if not 0 <= offset <= 2**62:
        raise ApiError(422, "offset: must be between 0 and 2^62", "offset")
    jobs, total = store.list_jobs(None if sees_all(user) else user.name, status, limit, offset)
    return JobList(jobs=[JobSummary.of(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, summary="One job: status, progress, spec, result")
def get_job(job: VisibleJob):
    return JobOut.of(job)


@router.delete("/v1/jobs/{job_id}", response_model=Cancelled,
               summary="Cancel a job (queued: at once; running: at the next check)")
def cancel_job(job: VisibleJob, store: StoreDep):
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, f"job {job.id} has already {job.status}")
    return Cancelled(id=job.id, status=store.cancel(job.id), cancel_requested=True)


@router.get("/v1/jobs/{job_id}/events", summary="Progress as server-sent events, until the job ends")
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

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/jobs/{job_id}/front", response_model=FrontOut,
            summary="The result's Pareto front (a merge: its one candidate, id 0)")
def front(job: VisibleJob, settings: SettingsDep, store: StoreDep):
    cands = [CandidateOut.of(c) for c in store.candidates(job.id)]
    if not cands and job.kind == "evolve" and job.status not in TERMINAL:
        cands = live_candidates(settings.job_dir(job.id) / "search")
    result = job.result or {}
    names = result.get("objectives") or sorted({k for c in cands for k in c.objectives})
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
            summary="A candidate as a tar of a HF model folder (202 + Retry-After while it is built)")
def checkpoint(cid: int, job: VisibleJob, settings: SettingsDep, store: StoreDep, exports: ExportsDep):
    if not 0 <= cid <= 2**62 or store.candidate(job.id, cid) is None:
        hint = "" if job.status == "succeeded" else f" (the job is {job.status})"
        raise ApiError(404, f"job {job.id} has no candidate {cid}{hint}")
    tar = settings.job_dir(job.id) / "exports" / f"{cid}.tar"
    if tar.is_file():
        return FileResponse(tar, media_type="application/x-tar", filename=f"{job.id}-{cid}.tar")
    error = exports.start(job, cid)
    if error:
        raise ApiError(500, f"building the checkpoint failed: {error}")
    return JSONResponse({"detail": "the checkpoint is being built; retry shortly"}, 202, headers={"Retry-After": "2"})
