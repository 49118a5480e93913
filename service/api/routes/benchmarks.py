"""Benchmark routes: upload a benchmark as JSONL items under a name, and list the uploads.

An evolve spec may name an uploaded benchmark instead of a file under the model roots. Each
upload is a new file named by its content's hash: jobs accepted earlier keep measuring what
was checked when they were submitted.
"""
from __future__ import annotations

import hashlib
import re
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from core.fs import atomic_write
from service.api.body import read_body
from service.api.deps import SettingsDep, StoreDep, UserDep, may_see, owner_of
from service.api.models import BenchmarkList, BenchmarkOut
from service.errors import ApiError
from service.store import BenchmarkRow

BENCHMARK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # fullmatch: no trailing newline

router = APIRouter()


@router.post("/v1/benchmarks", status_code=201, response_model=BenchmarkOut,
             summary="Upload a benchmark: the body is JSONL items")
async def upload_benchmark(request: Request, name: str, user: UserDep, settings: SettingsDep, store: StoreDep):
    from data.benchmarks import BenchmarkError, content_hash, parse_items

    if not BENCHMARK_NAME.fullmatch(name):
        raise ApiError(422, "name: letters, digits, '_', '.', '-' only (at most 128)", "name")
    existing = store.get_benchmark(name)
    if existing is not None and not may_see(user, existing.owner):
        raise ApiError(409, f"name: benchmark {name!r} belongs to another user", "name")
    raw = await read_body(request, settings.max_benchmark_bytes, "the benchmark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(422, f"body: not UTF-8 text ({e.reason} at byte {e.start})", "body") from None
    try:
        items = parse_items(text.splitlines(), source=name)
    except BenchmarkError as e:
        if e.line is None:
            raise ApiError(422, str(e), "body") from None
        raise ApiError(422, f"line {e.line}: {str(e).removeprefix(f'{name}:{e.line}: ')}", f"line {e.line}") from None
    digest = content_hash(items)
    path = settings.benchmark_dir / f"{name}-{hashlib.sha256(raw).hexdigest()[:16]}.jsonl"
    await run_in_threadpool(atomic_write, path, raw)
    row = BenchmarkRow(name=name, owner=owner_of(user), path=str(path.absolute()), items=len(items),
                       hash=digest, bytes=len(raw), created_at=time.time())
    store.put_benchmark(row)
    return BenchmarkOut.of(row)


@router.get("/v1/benchmarks", response_model=BenchmarkList, summary="Uploaded benchmarks")
def list_benchmarks(user: UserDep, store: StoreDep):
    return BenchmarkList(benchmarks=[BenchmarkOut.of(b) for b in store.list_benchmarks() if may_see(user, b.owner)])

