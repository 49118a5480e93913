"""Operations routes: /healthz (no auth, for load balancers), /metrics (Prometheus), and the
page a person opens, /jobs/{id}: the job's progress and Pareto front, drawn by the browser
from the JSON routes."""
from __future__ import annotations

from collections import defaultdict
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from service.api.deps import COOKIE, SettingsDep, StoreDep, current_user, known_user, visible_job
from service.api.models import Health
from service.errors import ApiError
from service.page import error_page, job_page
from service.schemas import KINDS
from service.store import Store

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness and database reachability (no auth)")
def healthz(store: StoreDep):
    try:
        store.counts_by_status()
    except Exception:
        return JSONResponse({"status": "unavailable", "detail": "the job store is not reachable"}, 503)
    return Health(status="ok", kinds=list(KINDS))


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            dependencies=[Depends(current_user)])
def metrics(store: StoreDep):
    return PlainTextResponse(prometheus_text(store), media_type="text/plain; version=0.0.4")


@router.get("/jobs/{job_id}", response_class=HTMLResponse, summary="The job's page: progress and Pareto front")
def page(job_id: str, request: Request, settings: SettingsDep, store: StoreDep, token: str | None = None):
    try:
        if token is not None:  # move the token into a cookie and off the address bar
            resp = RedirectResponse(f"/jobs/{quote(job_id, safe='')}", 303)
            if settings.auth:
                known_user(settings, token)
                resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return resp
        visible_job(job_id, current_user(request, settings), store)
    except ApiError as e:  # a person reads this one: a page, not JSON
        hint = " Open the page as /jobs/ID?token=YOUR_TOKEN." if e.status_code == 401 else ""
        return HTMLResponse(error_page(e.status_code, f"{e.detail}.{hint}"), e.status_code, headers=e.headers)
    return HTMLResponse(job_page(job_id))


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    return Response(status_code=204)


def prometheus_text(store: Store) -> str:
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
