"""The API's response bodies as pydantic models: the `response_model` of each route, so the
OpenAPI document describes what comes back, built from the store's rows (`JobOut.of(row)`) so
that a table and the JSON a client reads can change apart.

Field order is the JSON's key order. Values the store keeps as JSON (a spec, progress, a
result, objective values) are passed through as they are: `Number` keeps an int an int.
"""
from __future__ import annotations

from typing import Any, Self, Union

from pydantic import BaseModel, ConfigDict

from service.store import BenchmarkRow, CandidateRow, Job

Number = Union[int, float]


class JobSummary(BaseModel):
    """A job as listed: everything but its spec."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    status: str
    owner: str | None
    device: str
    worker: str | None
    attempts: int
    cancel_requested: bool
    error: str | None
    progress: dict[str, Any] | None
    evaluations: int
    result: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def of(cls, job: Job) -> Self:
        return cls.model_validate(job)


class JobOut(JobSummary):
    """One job: status, progress, result, and the checked spec it runs."""

    spec: dict[str, Any]


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int
    limit: int
    offset: int


class Cancelled(BaseModel):
    id: str
    status: str
    cancel_requested: bool


class CandidateOut(BaseModel):
    """A candidate of a result: its merge parameters, estimated and (on the front) true objectives."""

    id: int
    params: Any
    objectives: dict[str, Number | None]
    true_objectives: dict[str, Number | None] | None
    on_front: bool
    sd: dict[str, Number | None] | None = None  # each estimate's sd, where its estimator reports one

    @classmethod
    def of(cls, row: CandidateRow) -> Self:
        return cls(id=row.cid, params=row.params, objectives=row.objectives, true_objectives=row.true_objectives,
                   on_front=row.on_front, sd=row.sd)


class FrontOut(BaseModel):
    """A job's Pareto front; a merge's is its one candidate, id 0."""

    job_id: str
    kind: str
    status: str
    objectives: list[str]
    senses: dict[str, str | None]
    knee: int | None
    hypervolume: Number | None
    true_hypervolume: Number | None
    candidates: list[CandidateOut]


class BenchmarkOut(BaseModel):
    """An uploaded benchmark (its file stays on the server)."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    owner: str | None
    items: int
    hash: str
    bytes: int
    created_at: float

    @classmethod
    def of(cls, row: BenchmarkRow) -> Self:
        return cls.model_validate(row)


class BenchmarkList(BaseModel):
    benchmarks: list[BenchmarkOut]


class IrtParamsOut(BaseModel):
    """Item parameters stored for a benchmark's items (`fitness.params_store`): where they came
    from (``fitted`` on a response matrix of ``rows`` models, or ``imported``) and when."""

    id: str
    benchmark: str
    benchmark_hash: str
    items: int
    source: str
    rows: int
    model: str
    dims: int
    created_at: str
    observed: int | None = None
    fitter: str | None = None
    file: str | None = None

    @classmethod
    def of(cls, summary: dict[str, Any]) -> Self:
        return cls.model_validate({k: summary.get(k) for k in cls.model_fields if k in summary})


class IrtParamsList(BaseModel):
    """A benchmark's stored item parameters, oldest first; a job uses the last."""

    benchmark: str
    hash: str
    entries: list[IrtParamsOut]


class Health(BaseModel):
    status: str
    kinds: list[str]
