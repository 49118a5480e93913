"""Benchmark routes: upload a benchmark as JSONL items under a name, and list the uploads; store
IRT item parameters for an uploaded benchmark's items (fitted on a leaderboard's response matrix,
or imported) and list them.

An evolve spec may name an uploaded benchmark instead of a file under the model roots. Each
upload is a new file named by its content's hash: jobs accepted earlier keep measuring what
was checked when they were submitted. Item parameters go to `fitness.params_store` (this
machine's store, keyed by the benchmark's content hash), where a job on the benchmark finds them.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from core.fs import atomic_write
from service.api.body import parse_json, read_body
from service.api.deps import SettingsDep, StoreDep, UserDep, may_see, owner_of
from service.api.models import BenchmarkList, BenchmarkOut, IrtParamsList, IrtParamsOut, links, refusals
from service.errors import ApiError
from service.store import BenchmarkRow

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
NAME_RULE = "letters, digits, '_', '.', '-', starting with a letter or digit, at most 128"
# the pattern is checked by `checked_name` (to say the rule in words) and published in the schema
NameQuery = Annotated[str, Query(description=NAME_RULE, json_schema_extra={"pattern": NAME_PATTERN})]
NamePath = Annotated[str, Path(description=NAME_RULE, json_schema_extra={"pattern": NAME_PATTERN})]
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "text/plain",
               "application/octet-stream")
BINARY = {"schema": {"type": "string", "format": "binary"}}

router = APIRouter()


def checked_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise ApiError(422, f"name: {NAME_RULE}", "name")
    return name


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@router.post("/v1/benchmarks", status_code=201, response_model=BenchmarkOut,
             summary="Upload a benchmark: the body is JSONL items (application/x-ndjson; text/plain is read too)",
             responses=refusals(400, 409, 413, 415, 422) | {
                 201: {"description": "Stored", "links": links("name", "$response.body#/name", "upload_irt", "list_irt")}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/x-ndjson": BINARY}}})
async def upload_benchmark(request: Request, name: NameQuery, user: UserDep, settings: SettingsDep,
                           store: StoreDep):
    from data.benchmarks import BenchmarkError, content_hash, parse_items

    checked_name(name)
    if media_type(request) not in JSONL_TYPES + ("",):
        raise ApiError(415, f"content-type: a benchmark is JSONL (application/x-ndjson), not {media_type(request)}",
                       "content-type")
    existing = store.get_benchmark(name)
    if existing is not None and not may_see(user, existing.owner):
        raise ApiError(409, f"name: benchmark {name!r} belongs to another user", "name")
    raw = await read_body(request, settings.max_benchmark_bytes, "the benchmark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"body: not UTF-8 text ({e.reason} at byte {e.start})", "body") from None
    try:
        items = parse_items(text.splitlines(), source=name)
    except BenchmarkError as e:
        if e.line is None:
            raise ApiError(400, str(e), "body") from None
        raise ApiError(400, f"line {e.line}: {str(e).removeprefix(f'{name}:{e.line}: ')}", f"line {e.line}") from None
    digest = content_hash(items)
    path = settings.benchmark_dir / f"{name}-{hashlib.sha256(raw).hexdigest()[:16]}.jsonl"
    await run_in_threadpool(atomic_write, path, raw)
    row = BenchmarkRow(name=name, owner=owner_of(user), path=str(path.absolute()), items=len(items),
                       hash=digest, bytes=len(raw), created_at=time.time())
    store.put_benchmark(row)
    return BenchmarkOut.of(row)


@router.post("/v1/benchmarks/lm-eval", status_code=201, response_model=BenchmarkOut,
             summary="Import an lm-eval task over dataset files under the model roots as a benchmark",
             responses=refusals(400, 409, 413, 415, 422) | {
                 201: {"description": "Stored", "links": links("name", "$response.body#/name", "upload_irt", "list_irt")}},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/LmEvalImport"}}}}})
async def import_lm_eval(request: Request, name: NameQuery, user: UserDep, settings: SettingsDep, store: StoreDep):
    from pydantic import ValidationError

    from service.api.models import LmEvalImport
    from service.schemas import SpecError, describe_error

    checked_name(name)
    if media_type(request) not in JSON_TYPES:
        raise ApiError(415, f"content-type: the import is sent as application/json, not {media_type(request)}",
                       "content-type")
    existing = store.get_benchmark(name)
    if existing is not None and not may_see(user, existing.owner):
        raise ApiError(409, f"name: benchmark {name!r} belongs to another user", "name")
    try:
        body = LmEvalImport.model_validate(parse_json(await read_body(request, settings.max_body_bytes, "the import")))
    except ValidationError as e:
        field, msg = describe_error(e.errors()[0])
        raise ApiError(422, f"{field}: {msg}" if field else msg, field or "body") from None
    try:
        raw, digest, n = await run_in_threadpool(_import_lm_eval, body, settings)
    except SpecError as e:
        raise ApiError(400, str(e), e.field) from None
    path = settings.benchmark_dir / f"{name}-{hashlib.sha256(raw).hexdigest()[:16]}.jsonl"
    await run_in_threadpool(atomic_write, path, raw)
    row = BenchmarkRow(name=name, owner=owner_of(user), path=str(path.absolute()), items=n, hash=digest,
                       bytes=len(raw), created_at=time.time())
    store.put_benchmark(row)
    return BenchmarkOut.of(row)


def _import_lm_eval(body, settings) -> tuple[bytes, str, int]:
    """(JSONL bytes, content hash, items) of an lm-eval import; SpecError naming the field."""
    from pathlib import Path as FilePath

    from data.benchmarks import content_hash
    from data.lm_eval_tasks import TaskError, import_task
    from service.schemas import SpecError, resolve_path

    def files(key: str, given: list[str] | None) -> list | None:
        return None if given is None else [resolve_path(FilePath(f), f"{key}[{i}]", settings.model_roots, "file",
                                                        [settings.artifacts]) for i, f in enumerate(given)]

    try:
        items, _ = import_task(body.task, files("data", body.data), files("fewshot_data", body.fewshot_data),
                               body.num_fewshot, body.fewshot_sampler, body.limit)
    except TaskError as e:
        raise SpecError("task", str(e)) from None
    raw = "".join(json.dumps(item.to_json()) + "\n" for item in items).encode()
    return raw, content_hash(items), len(items)


@router.get("/v1/benchmarks", response_model=BenchmarkList, summary="Uploaded benchmarks", responses=refusals())
def list_benchmarks(user: UserDep, store: StoreDep):
    return BenchmarkList(benchmarks=[BenchmarkOut.of(b) for b in store.list_benchmarks() if may_see(user, b.owner)])



CSV_TYPES = ("text/csv", "application/csv", "text/plain")
JSON_TYPES = ("application/json", "text/json")


def _visible_benchmark(store, user, name: str):
    """The uploaded benchmark `name` parsed (404 naming `name` when the caller has none such)."""
    from data.benchmarks import load_benchmark

    row = store.get_benchmark(checked_name(name))
    if row is None or not may_see(user, row.owner):
        raise ApiError(404, f"name: no uploaded benchmark {name!r}", "name")
    return load_benchmark(row.path, name=name)


def _store_irt(bench, media: str, raw: bytes):
    """Fits (CSV) or imports (JSON) and stores; a FieldError becomes a 422 naming its field."""
    from core.errors import FieldError
    from fitness import params_store

    try:
        if media in CSV_TYPES:
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise FieldError("body", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
            y, _ = params_store.parse_csv_matrix(text, bench)
            return params_store.fit_matrix(bench, y, file="upload.csv")
        return params_store.import_params(bench, parse_json(raw), file="upload.json")
    except FieldError as e:
        raise ApiError(400, str(e), e.field) from None
    except ValueError as e:
        raise ApiError(400, f"body: {str(e).splitlines()[0]}", "body") from None


@router.post("/v1/benchmarks/{name}/irt", status_code=201, response_model=IrtParamsOut,
             summary="Store item parameters for an uploaded benchmark: a response matrix (text/csv, fitted "
                     "here) or parameters A, B, item_ids (application/json)",
             responses=refusals(400, 404, 413, 415, 422),
             openapi_extra={"requestBody": {"required": True, "content": {
                 "text/csv": {"schema": {"type": "string"}},
                 "application/json": {"schema": {"$ref": "#/components/schemas/IrtImport"}}}}})
async def upload_irt(request: Request, name: NamePath, user: UserDep, settings: SettingsDep, store: StoreDep):
    media = media_type(request)
    if media not in CSV_TYPES + JSON_TYPES:
        raise ApiError(415, f"content-type: a response matrix is text/csv, parameters application/json, not "
                            f"{media or 'none'}", "content-type")
    bench = await run_in_threadpool(_visible_benchmark, store, user, name)
    raw = await read_body(request, settings.max_irt_bytes, "the item parameters")
    entry = await run_in_threadpool(_store_irt, bench, media, raw)
    return IrtParamsOut.of(entry.summary())


@router.get("/v1/benchmarks/{name}/irt", response_model=IrtParamsList,
            summary="Item parameters stored for an uploaded benchmark's items (a job uses the last)",
            responses=refusals(404, 422))
def list_irt(name: NamePath, user: UserDep, store: StoreDep):
    from fitness import params_store

    bench = _visible_benchmark(store, user, name)
    return IrtParamsList(benchmark=name, hash=bench.hash,
                         entries=[IrtParamsOut.of(e.summary()) for e in params_store.entries(bench.hash)])
