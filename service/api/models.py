"""The API's response bodies as pydantic models: the `response_model` of each route, so the
OpenAPI document describes what comes back, built from the store's rows (`JobOut.of(row)`) so
that a table and the JSON a client reads can change apart; and `refusals(...)`, the error
answers a route documents, all in one shape (`ErrorOut`).

Field order is the JSON's key order. Values the store keeps as JSON (a spec, progress, a
result, objective values) are passed through as they are: `Number` keeps an int an int.
"""
from __future__ import annotations

from typing import Any, Literal, Self, Union

from pydantic import BaseModel, ConfigDict, Field

from service.store import BenchmarkRow, CandidateRow, Job

Number = Union[int, float]
Kind = Literal["merge", "evolve", "mergekit"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]  # store.STATES


class ErrorOut(BaseModel):
    """Every refusal: a one-line `detail`, and the `field` at fault when one part of the request is
    (a spec field such as `models[1].path`, `body`, `limit`, `content-type`, ...)."""

    detail: str
    field: str | None = None


class Pending(BaseModel):
    """202: the answer is being prepared; retry after the `Retry-After` header's seconds."""

    detail: str


WHY = {
    400: "The request fits the documented schema but cannot be served: a spec names a model, benchmark or "
         "device this server does not have, its parts disagree (e.g. one weight per model) or its memory plan "
         "does not fit; an uploaded body's content is not what it should be (a JSONL line that is not an item, "
         "item parameters for other items); `field` names the part at fault",
    401: "No bearer token, or an unknown one (`WWW-Authenticate: Bearer`)",
    404: "No such job, candidate or benchmark, or it belongs to another user",
    409: "Conflicts with the resource's state (a finished job cannot be cancelled; a name taken by another user)",
    413: "The body is larger than this server's limit",
    415: "The body's Content-Type is not one this route reads",
    422: "The request does not match the documented schema (a type, a pattern, a missing field, JSON that does "
         "not parse, a number that is NaN or infinite or sent as a string); `field` names the first part at fault",
    429: "Too many accepted submissions in the last minute; retry after `Retry-After` seconds",
    500: "Building the answer failed on the server",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
HEADERS = {401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}, 429: RETRY_AFTER}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI `content` of `model` as JSON, whatever the route's own media type (a tar, a stream);
    `app.create_app` puts the models named here among the document's schemas."""
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


def links(parameter: str, value: str, *operations: str) -> dict[str, Any]:
    """OpenAPI links from a created resource to the operations that take it as `parameter`."""
    return {op: {"operationId": op, "parameters": {parameter: value}} for op in operations}


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of the error answers a route can give (401 on every route
    but /healthz: tokens are configured on a server or not)."""
    return {code: {"description": WHY[code], "content": json_body(ErrorOut)} | (
        {"headers": HEADERS[code]} if code in HEADERS else {}) for code in sorted({401, *codes})}


class JobSummary(BaseModel):
    """A job as listed: everything but its spec."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: Kind
    status: Status
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
    status: Status
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
    kind: Kind
    status: Status
    objectives: list[str]
    senses: dict[str, Literal["max", "min"] | None]
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


class LmEvalImport(BaseModel):
    """An lm-eval task over dataset files under the model roots (`POST /v1/benchmarks/lm-eval`;
    `data/lm_eval_tasks.py`, as `evomerge benchmark import`)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., min_length=1, max_length=200, description="the task's name in the server's lm-eval")
    data: list[str] = Field(..., min_length=1, max_length=1000, description="the split to evaluate: Parquet, "
                            "JSONL or JSON files under the model roots")
    fewshot_data: list[str] | None = Field(None, max_length=1000, description="the few-shot split's files")
    num_fewshot: int | None = Field(None, ge=0, le=1000, description="default: the task's")
    fewshot_sampler: Literal["first_n"] | None = None
    limit: int | None = Field(None, ge=1, le=10_000_000)


class IrtImport(BaseModel):
    """Item parameters to import (the request body of `POST /v1/benchmarks/{name}/irt` as JSON),
    tinyBenchmarks-style: discriminations `A` ([items] or [items, dims] / [dims, items]), difficulties
    `B` ([items], or per dimension, summed), `item_ids` (exactly the benchmark's, any order); our
    own item parameter files (`ItemParams.save`) are read too."""

    model_config = ConfigDict(extra="allow")

    A: list[float] | list[list[float]]
    B: list[float] | list[list[float]]
    item_ids: list[str]
    rows: int | None = None
    model: str | None = None


class IrtParamsList(BaseModel):
    """A benchmark's stored item parameters, oldest first; a job uses the last."""

    benchmark: str
    hash: str
    entries: list[IrtParamsOut]


class Health(BaseModel):
    """200: serving (`kinds`: the job kinds this server runs); 503: the job store is not reachable."""

    status: Literal["ok", "unavailable"]
    kinds: list[Kind]
    detail: str | None = None
