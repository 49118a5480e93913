"""How the API refuses a request: one line of JSON, `{"detail": "..."}`, plus `"field"` when one
part of the request is at fault (a spec field such as `models[1].path`, `body`, `limit`, ...).

Routes raise `ApiError`; the checks of a job spec raise `service.schemas.SpecError`. The
handlers in `EXCEPTION_HANDLERS` (installed by `create_app`) turn those, FastAPI's own
parameter validation errors and any unexpected exception into that one shape, so a client
never sees a traceback or a multi-line message.
"""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

from .jobs import one_line
from .schemas import SpecError, describe_error

REQUEST_PARTS = ("query", "path", "body", "header")  # where FastAPI says a parameter came from; not a field


class ApiError(HTTPException):
    """An HTTP error with a one-line message and, for an error in one part of the request, that part."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict | None = None):
        super().__init__(status, detail, headers)
        self.field = field


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    body: dict[str, Any] = {"detail": e.detail}
    if getattr(e, "field", None):
        body["field"] = e.field
    headers = getattr(e, "headers", None)
    if e.status_code == 405:  # Starlette names the first route of the path only; the path may have several
        headers = {"Allow": ", ".join(allowed_methods(request))}
    return JSONResponse(body, e.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (asked of each route, as routing does)."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    return [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
            if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


async def spec_error(request: Request, e: SpecError) -> JSONResponse:
    return JSONResponse({"detail": str(e), "field": e.field}, e.status)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """A query or path parameter of the wrong type, or missing: the first error, named like a spec field."""
    err = e.errors()[0]
    field, msg = describe_error(err, [p for p in err["loc"] if p not in REQUEST_PARTS])
    field = field or "request"
    return JSONResponse({"detail": f"{field}: {msg}", "field": field}, 422)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"internal error: {one_line(e)}"}, 500)


EXCEPTION_HANDLERS = {HTTPException: http_error, SpecError: spec_error, RequestValidationError: validation_error,
                      Exception: internal_error}
