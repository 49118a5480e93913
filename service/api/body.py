"""Request bodies read by hand: job specs and benchmark uploads are read raw (not declared as
FastAPI body parameters) so that size limits and malformed JSON get the API's own one-line
answers, naming `body`, instead of FastAPI's."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from core.validation import field_path, non_finite
from service.errors import ApiError


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
    """A request body as JSON; 422 naming `body` for anything else, and naming the field (`params.weights[0]`)
    for a NaN, an infinity or a number too large for a float (`1e999`)."""
    try:
        data = json.loads(raw or b"null")
    except RecursionError:
        raise ApiError(422, "body: nested too deeply", "body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"body: not valid JSON ({str(e).splitlines()[0]})", "body") from None
    bad = non_finite(data)
    if bad is not None:
        field = field_path(bad) or "body"
        raise ApiError(422, f"{field}: must be a finite number (not NaN or infinity)", field)
    return data
