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

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .api.deps import RateLimiter
from .api.routes import benchmarks, jobs, ops
from .config import Settings
from .errors import EXCEPTION_HANDLERS
from .exports import Exports
from .store import Store

STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API over `settings` (default: from the environment) and `store` (default: the settings' database)."""
    settings = settings or Settings.from_env()
    store = store or Store(settings.database_url)
    docs = {} if not settings.auth else {"openapi_url": None, "docs_url": None, "redoc_url": None}  # all or nothing
    # JSONResponse writes with Python's json, not pydantic's: numbers keep the form clients know (1e-05, not 0.00001)
    app = FastAPI(title="evomerge", version="0.1.0", summary="Evolutionary model merging as a service",
                  default_response_class=JSONResponse, exception_handlers=EXCEPTION_HANDLERS,
                  redirect_slashes=False, generate_unique_id_function=lambda route: route.name, **docs)
    app.state.settings, app.state.store = settings, store
    app.state.limiter = RateLimiter(settings.rate_limit_per_minute)
    app.state.exports = Exports(settings)
    for module in (jobs, benchmarks, ops):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's scripts: no CDN
    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    """The OpenAPI document as clients need it: the bodies the routes read themselves (a job spec,
    item parameters: read raw, to answer size limits and errors their own way, so FastAPI cannot
    infer them) and the JSON answers of routes that otherwise send files or streams among the schemas, and no trace of FastAPI's own 422 body, which this API never sends (`errors.ErrorOut` instead)."""
    from pydantic import TypeAdapter

    from .api.models import ErrorOut, IrtImport, LmEvalImport, Pending
    from .schemas import JobSpec

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = default_openapi()
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, model in (("JobSpec", JobSpec), ("IrtImport", IrtImport), ("LmEvalImport", LmEvalImport),
                                ("ErrorOut", ErrorOut), ("Pending", Pending)):
                schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[name] = schema
            for path in doc["paths"].values():
                for op in path.values():
                    default_422 = op["responses"].get("422", {}).get("content", {}).get("application/json", {})
                    if default_422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        del op["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi
