"""Runs of rows: a `chunkable` method merges a large tensor a run of rows at a time.

A per-element method is a chain of elementwise passes (TIES: about 30 over each task vector's
float32 copy). On a whole 100 M-entry tensor every pass streams it from main memory; on runs of
at most `CHUNK` entries (4 MB in float32 a tensor) the chain stays in the CPU's caches, and the
method costs about half as much (TIES' sign election and disjoint mean on this machine: 16 ns an
entry whole, 7 in runs). The values are the same (the registry's `chunkable` promise); a method
with a `context` (TIES' trims) has it found over the whole tensor first, and each run gets its
flat offset. The evolve job's resident merge writes candidates in the same runs (it never holds a
whole float32 task vector).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

CHUNK = 1 << 20  # entries per run of rows merged at once (4 MB in float32)


def row_chunks(shape: Sequence[int], chunkable: bool) -> list[tuple[int, int]]:
    """Runs of rows [a, b) of at most CHUNK elements (a multiple of 8 of them, for packed bits)."""
    rows = shape[0] if len(shape) else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    if not chunkable or len(shape) < 2 or rows * per_row <= CHUNK:
        return [(0, rows)]
    step = max(8, CHUNK // max(per_row, 1) // 8 * 8)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def run_kwargs(method, ctx: dict, offset: int) -> dict:
    """The keywords of `method.fn` on a run starting at flat index `offset`: its context, its offset."""
    return {**ctx, "offset": offset} if method.positional else ctx


RowFn = Callable[[int, int, torch.Tensor], torch.Tensor]  # (a, b, base rows a..b in float32) -> its rows; 2+ dims


def tensor_rows(t: torch.Tensor) -> RowFn:
    """The `RowFn` of a task vector held whole."""
    return lambda a, b, _: t[a:b]


def merge_rows(method, base: torch.Tensor, deltas: Sequence[torch.Tensor | RowFn], p, name: str) -> torch.Tensor:
    """``method.fn(base, deltas, p, name)`` in float32, run of rows by run of rows when the method
    is `chunkable` and needs no `prepare` (TSV's SVDs take the whole matrix): the same values.

    ``base`` may be in its stored dtype and each task vector a `RowFn` that makes its rows from
    the base's (`merging.task_vectors`: a fine-tune's rows minus the base's, promoted inside the
    subtraction): then no whole float32 copy of any input exists, and every conversion runs in
    the cache with the method's passes."""
    spans = row_chunks(base.shape, method.chunkable and method.prepare is None)
    if len(spans) == 1:
        whole = base.float()
        return method.fn(whole, [d if isinstance(d, torch.Tensor) else d(0, len(whole), whole) for d in deltas], p, name)
    rows = [tensor_rows(d) if isinstance(d, torch.Tensor) else d for d in deltas]
    ctx = {}
    if method.context is not None:
        streams = [(lambda d=d: [d.reshape(-1)]) if isinstance(d, torch.Tensor) else
                   (lambda f=f: (f(a, b, base[a:b].float()).reshape(-1) for a, b in spans)) for d, f in zip(deltas, rows)]
        ctx = {"ctx": method.context(streams, base.numel(), p, name)}
    per_row = math.prod(base.shape[1:])
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    for a, b in spans:
        part = base[a:b].float()
        out[a:b] = method.fn(part, [f(a, b, part) for f in rows], p, name, **run_kwargs(method, ctx, a * per_row))
    return out
