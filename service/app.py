"""The REST API (FastAPI): `create_app` puts together the routers, the error handlers and the
job spec's schema in the OpenAPI document.

Routes (docs/guide.md): jobs are submitted, listed, read, cancelled, followed as server-sent
events, and their results read as a Pareto front or downloaded as a tar of a HF model folder
(`service.api.routes.jobs`); benchmarks are uploaded as JSONL (`service.api.routes.benchmarks`);
/healthz, /metrics and the page /jobs/{id} complete it (`service.api.routes.ops`). Auth and
who sees what: `service.api.deps`; response bodies: `service.api.models`. Errors are JSON
`{"detail": "..."}` one-liners; spec errors add `"field"` (`service.errors`). `service.serve`
runs the API next to its workers.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from .api.deps import RateLimiter
from .api.routes import benchmarks, jobs, ops
from .config import Settings
from .errors import EXCEPTION_HANDLERS
from .exports import Exports
from .store import Store


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API over `settings` (default: from the environment) and `store` (default: the settings' database)."""
    settings = settings or Settings.from_env()
    store = store or Store(settings.database_url)
    docs = {} if not settings.auth else {"openapi_url": None, "docs_url": None, "redoc_url": None}  # all or nothing
    # JSONResponse writes with Python's json, not pydantic's: numbers keep the form clients know (1e-05, not 0.00001)
    app = FastAPI(title="evomerge", version="0.1.0", summary="Evolutionary model merging as a service",
                  default_response_class=JSONResponse, exception_handlers=EXCEPTION_HANDLERS, **docs)
    app.state.settings, app.state.store = settings, store
    app.state.limiter = RateLimiter(settings.rate_limit_per_minute)
    app.state.exports = Exports(settings)
    for module in (jobs, benchmarks, ops):
        app.include_router(module.router)
    _document_job_spec(app)
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
