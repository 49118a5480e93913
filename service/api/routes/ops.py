"""Operations routes: /healthz (no auth, for load balancers), /metrics (Prometheus, the caller's
jobs; an admin's: all), and the page a person opens, /jobs/{id}: the job's progress and Pareto
front, drawn by the browser from the JSON routes."""
from __future__ import annotations

from collections import defaultdict
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from service.api.deps import COOKIE, SettingsDep, StoreDep, UserDep, current_user, known_user, sees_all, visible_job
from service.api.models import Health, refusals
from service.errors import ApiError
from service.page import error_page, job_page
from service.schemas import KINDS
from service.store import Store

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
HTML = {"text/html": {"schema": {"type": "string"}}}

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Liveness and database reachability (no auth)",
            responses={503: {"model": Health, "description": "The job store is not reachable"}})
def healthz(store: StoreDep):
    try:
        store.counts_by_status()
    except Exception:
        return JSONResponse({"status": "unavailable", "kinds": [], "detail": "the job store is not reachable"}, 503)
    return Health(status="ok", kinds=list(KINDS))


class PrometheusText(Response):
    media_type = PROMETHEUS_TEXT


@router.get("/metrics", summary="Prometheus metrics of the caller's jobs (an admin's: every job)",
            response_class=PrometheusText, responses=refusals() | {
                200: {"description": "Prometheus text format", "content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})
def metrics(user: UserDep, store: StoreDep):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreMetrics(store, None if sees_all(user) else user.name))
    return PrometheusText(generate_latest(registry))


@router.get("/jobs/{job_id}", response_class=HTMLResponse, summary="The job's page: progress and Pareto front",
            responses={200: {"description": "The page", "content": HTML},
                       303: {"description": "Opened with ?token=: the token moves to a cookie; to the page"},
                       401: {"description": "No known token (an HTML page saying so)", "content": HTML},
                       404: {"description": "No such job, or another user's (an HTML page)", "content": HTML}})
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


class StoreMetrics:
    """A prometheus_client collector over the job store (so it covers every worker), limited to
    `owner`'s jobs unless None: queue depth, jobs by state, evaluations, each running job's
    evaluators' candidates and throughput, run time of finished jobs."""

    def __init__(self, store: Store, owner: str | None):
        self.store, self.owner = store, owner

    def collect(self):
        counts = self.store.counts_by_status(self.owner)
        yield GaugeMetricFamily("evomerge_queue_depth", "Jobs waiting for a worker.", value=counts["queued"])
        jobs = GaugeMetricFamily("evomerge_jobs", "Jobs by state.", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield CounterMetricFamily("evomerge_evaluations", "Candidate evaluations reported by jobs.",
                                  value=self.store.total_evaluations(self.owner))
        scored = GaugeMetricFamily("evomerge_evaluator_candidates", "Candidates each evaluator of a running "
                                   "job has scored (execution: ray gives one per actor).", labels=["job", "evaluator"])
        rate = GaugeMetricFamily("evomerge_evaluator_candidates_per_minute", "Each evaluator's throughput while "
                                 "busy, in candidates per minute.", labels=["job", "evaluator"])
        for job_id, progress in self.store.running_progress(self.owner):
            for e in progress.get("evaluators") or []:
                labels = [job_id, str(e.get("evaluator"))]
                scored.add_metric(labels, e.get("candidates") or 0)
                if e.get("candidates_per_minute") is not None:
                    rate.add_metric(labels, e["candidates_per_minute"])
        yield scored
        yield rate
        by_kind: dict[str, list[float]] = defaultdict(list)
        for kind, seconds in self.store.durations(self.owner):
            by_kind[kind].append(seconds)
        durations = HistogramMetricFamily("evomerge_job_duration_seconds", "Run time of finished jobs.",
                                          labels=["kind"])
        for kind, values in sorted(by_kind.items()):
            buckets = [(floatToGoString(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS]
            durations.add_metric([kind], buckets + [("+Inf", len(values))], sum_value=sum(values))
        yield durations
