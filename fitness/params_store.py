"""Item parameters per benchmark, fitted on a leaderboard's answers or imported, kept on this machine.

IRT fitted on a job's own 15-20 rows describes its items poorly; fitted on hundreds of public
models' answers (what tinyBenchmarks publishes for its benchmarks), it makes adaptive testing
several times more accurate (issue 22). This module stores such parameters per benchmark, keyed
by the benchmark's content hash (`data.benchmarks.Benchmark.hash`: over its parsed items, so a
renamed or re-uploaded copy of the same items finds them), and `fitness.fitness.fit_benchmark`
uses the newest entry of a job's benchmark when the spec gives no `irt.params_file`.

Where: ``<cache_dir()>/irt-params/<benchmark hash>/<entry id>/`` with ``params.json`` (an
`ItemParams` file, items in the benchmark's order, with their ids) and ``meta.json`` (source
``fitted`` from R rows x N items or ``imported``, item ids, model, date, the file it came from).
The folder lies beside the per-machine cache's sections but is not one of them: `evomerge cache
prune` never removes it, because imported parameters cannot be recomputed. The API and the
workers that `evomerge serve` starts share this folder (same machine, same environment), so a
`POST /v1/benchmarks/{name}/irt` is seen by the next job on that benchmark.

Inputs, validated with one-line errors naming the field (`core.errors.FieldError`):

* a response matrix (`read_matrix`, `parse_csv_matrix`): CSV or Parquet, one row per model, one
  column per item id, 1 / 0 / blank (missing); a first column that is not an item id (named
  ``model``, ``name``, ... or holding other values than 0/1) is the models' names. NPZ: arrays
  ``responses`` [models, items] (NaN missing) and ``item_ids``.
* tinyBenchmarks-style parameters (`read_params`, `parse_params`): JSON or NPZ with ``A``
  (discriminations, [dims, items] or [items, dims]; tinyBenchmarks' own [1, dims, items] too),
  ``B`` (difficulties, [items], or per dimension as tinyBenchmarks keeps them, then summed:
  logit = sum_d (a_d theta_d - b_d)) and ``item_ids``; also our own `ItemParams` JSON.

Item ids must be exactly the benchmark's (any order; stored in the benchmark's).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.cache import cache_dir, touch
from core.errors import FieldError
from core.fs import atomic_write
from data.benchmarks import Benchmark

from .irt import FORMAT, ItemParams, fit_item_params

FOLDER = "irt-params"
NAME_COLUMNS = {"", "model", "models", "name", "model_name", "subject", "subject_id", "id"}
MAX_SHOWN = 60  # characters of an offending id or value quoted in an error


def store_root() -> Path:
    return cache_dir() / FOLDER


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= MAX_SHOWN else s[:MAX_SHOWN] + "...'"


# ---- entries -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredParams:
    """One stored entry: its folder and metadata; `params()` reads its item parameters."""

    path: Path
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return self.path.name

    def params(self) -> ItemParams:
        touch(self.path)
        return ItemParams.load(self.path / "params.json")

    def source(self) -> str:
        """How a job's describe() names these parameters, e.g. ``stored 20261207T...-a1b2c3 (fitted
        on 915 rows)``: the entry's id too, so that a job's settings key pins the entry it used."""
        m = self.meta
        if m.get("source") == "fitted":
            return f"stored {self.id} (fitted on {m.get('rows', 0)} rows)"
        rows = m.get("rows") or 0
        return f"stored {self.id} (imported" + (f", fitted on {rows} rows)" if rows else ")")

    def summary(self) -> dict[str, Any]:
        """The metadata without the item id list (what `irt list` and the API show)."""
        return {"id": self.id, **{k: v for k, v in self.meta.items() if k != "item_ids"}}


def entries(bench_hash: str | None = None, root: Path | None = None) -> list[StoredParams]:
    """Stored entries (of one benchmark hash, or all), oldest first within each benchmark."""
    root = root or store_root()
    hashes = [bench_hash] if bench_hash is not None else sorted(p.name for p in root.glob("*") if p.is_dir())
    out = []
    for h in hashes:
        folder = root / h
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            try:
                meta = json.loads((entry / "meta.json").read_text())
            except (OSError, ValueError):
                continue  # a half-removed or foreign folder: not an entry
            if (entry / "params.json").is_file():
                out.append(StoredParams(entry, meta))
    return out


def latest(bench_hash: str, root: Path | None = None) -> StoredParams | None:
    """The newest entry stored for this benchmark content hash, or None."""
    found = entries(bench_hash, root)
    return found[-1] if found else None


def save_entry(bench: Benchmark, params: ItemParams, meta: dict[str, Any], root: Path | None = None) -> StoredParams:
    """Stores `params` (items in the benchmark's order) with `meta`; the entry appears whole
    (written in a temporary folder, then renamed into place)."""
    if params.item_ids != bench.ids:
        raise ValueError("stored parameters must follow the benchmark's item order")
    root = root or store_root()
    now = datetime.now(timezone.utc)
    entry_id = now.strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]  # sorts by time
    meta = {"benchmark": bench.name, "benchmark_hash": bench.hash, "items": bench.__len__(),
            "model": params.model, "dims": params.dims, **meta, "created_at": now.isoformat(timespec="seconds"),
            "item_ids": list(bench.ids)}
    folder = root / bench.hash
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{entry_id}.tmp"
    tmp.mkdir()
    try:
        params.save(tmp / "params.json")
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=1))
        os.replace(tmp, folder / entry_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StoredParams(folder / entry_id, meta)


# ---- item ids ----------------------------------------------------------------------------------
def align(ids: Sequence[str], bench: Benchmark, what: str = "column") -> np.ndarray:
    """For each of the benchmark's items, its position in `ids`; FieldError('item_ids', ...) naming
    the first id that is not the benchmark's, repeated, or missing."""
    ids = [str(x) for x in ids]
    known = {x: j for j, x in enumerate(bench.ids)}
    seen: dict[str, int] = {}
    for pos, x in enumerate(ids):
        if x not in known:
            raise FieldError("item_ids", f"{what} {_short(x)} is not an item of benchmark {bench.name} "
                                         f"({len(bench)} items, e.g. {_short(bench.ids[0])})")
        if x in seen:
            raise FieldError("item_ids", f"{what} {_short(x)} appears twice")
        seen[x] = pos
    missing = [x for x in bench.ids if x not in seen]
    if missing:
        raise FieldError("item_ids", f"benchmark {bench.name}'s item {_short(missing[0])} has no {what}"
                                     f" ({len(missing)} of {len(bench)} items missing)")
    return np.array([seen[x] for x in bench.ids], dtype=int)


# ---- response matrices -------------------------------------------------------------------------
def _cell(value: Any, row: int, column: str) -> float:
    if value is None:
        return np.nan
    if isinstance(value, float) and np.isnan(value):
        return np.nan
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "na"):
        return np.nan
    if text in ("1", "1.0", "True", "true"):
        return 1.0
    if text in ("0", "0.0", "False", "false"):
        return 0.0
    raise FieldError("responses", f"row {row}, column {_short(column)}: {_short(text)} is not 0, 1 or blank")


def _is_binary(values: Sequence[Any]) -> bool:
    try:
        for v in values:
            _cell(v, 0, "")
    except FieldError:
        return False
    return True


def _table(header: list[str], rows: list[list[Any]], bench: Benchmark) -> tuple[np.ndarray, list[str]]:
    """Header + rows of cells -> ([models, items] in the benchmark's item order, NaN missing), row names."""
    if not header:
        raise FieldError("responses", "no header row: one column per item id")
    first = [r[0] if r else None for r in rows]
    names_col = header[0] not in set(bench.ids) and (header[0].strip().lower() in NAME_COLUMNS
                                                       or not _is_binary(first))
    columns = header[1:] if names_col else header
    if not rows:
        raise FieldError("responses", "no rows: one row per model")
    order = align(columns, bench)
    start = 1 if names_col else 0
    y = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise FieldError("responses", f"row {i + 1} has {len(r)} cells, the header {len(header)}")
        y[i] = [_cell(v, i + 1, c) for v, c in zip(r[start:], columns)]
    names = [str(v) for v in first] if names_col else [f"row{i + 1}" for i in range(len(rows))]
    return y[:, order], names


def parse_csv_matrix(text: str, bench: Benchmark) -> tuple[np.ndarray, list[str]]:
    """A CSV response matrix (see the module docstring) aligned with the benchmark's items."""
    try:
        lines = [r for r in csv.reader(io.StringIO(text)) if r]
    except csv.Error as e:
        raise FieldError("responses", f"not valid CSV ({e})") from None
    if not lines:
        raise FieldError("responses", "empty: a header row of item ids, then one row per model")
    return _table([h.strip() for h in lines[0]], lines[1:], bench)


def read_matrix(path: str | os.PathLike, bench: Benchmark) -> tuple[np.ndarray, list[str]]:
    """A response matrix file: .csv, .parquet or .npz (by suffix), aligned with the benchmark."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return parse_csv_matrix(path.read_text(encoding="utf-8-sig"), bench)
    if suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except ImportError as e:
            raise ValueError(f"reading Parquet needs pyarrow or fastparquet ({str(e).splitlines()[0]})") from None
        return _table([str(c) for c in df.columns], df.astype(object).values.tolist(), bench)
    if suffix == ".npz":
        data = _npz(path)
        for key in ("responses", "item_ids"):
            if key not in data:
                raise FieldError(key, f"{path.name} has no array {key!r} (it has {sorted(data)})")
        y = np.asarray(data["responses"], dtype=np.float64)
        if y.ndim != 2:
            raise FieldError("responses", f"must be [models, items], got shape {list(y.shape)}")
        ids = [str(x) for x in np.asarray(data["item_ids"]).reshape(-1)]
        if len(ids) != y.shape[1]:
            raise FieldError("item_ids", f"{len(ids)} ids for {y.shape[1]} columns of responses")
        order = align(ids, bench)
        bad = ~np.isnan(y) & ~np.isin(y, (0.0, 1.0))
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise FieldError("responses", f"row {i + 1}, column {_short(ids[j])}: {y[i, j]} is not 0, 1 or NaN")
        return y[:, order], [f"row{i + 1}" for i in range(y.shape[0])]
    raise ValueError(f"{path.name}: a response matrix is .csv, .parquet or .npz")


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{path.name}: not a readable NPZ file ({str(e).splitlines()[0]})") from None


def fit_matrix(bench: Benchmark, y: np.ndarray, *, model: str = "2pl", dims: int = 1, fitter: str = "map",
               seed: int = 42, file: str | None = None, root: Path | None = None) -> StoredParams:
    """Fits item parameters on a response matrix aligned with the benchmark's items and stores them."""
    observed = ~np.isnan(y)
    empty_cols = np.flatnonzero(~observed.any(axis=0))
    if empty_cols.size:
        raise FieldError("responses", f"item {_short(bench.ids[empty_cols[0]])} has no answer in any row")
    empty_rows = np.flatnonzero(~observed.any(axis=1))
    if empty_rows.size:
        raise FieldError("responses", f"row {empty_rows[0] + 1} has no answer")
    if y.shape[0] < 2:
        raise FieldError("responses", f"{y.shape[0]} row: IRT needs the answers of many models")
    t0 = time.perf_counter()
    params = fit_item_params(y, model, dims, fitter=fitter, seed=seed, item_ids=bench.ids)
    meta = {"source": "fitted", "rows": int(y.shape[0]), "observed": int(observed.sum()), "fitter": fitter,
            "seed": seed, "seconds": round(time.perf_counter() - t0, 3), "file": file}
    return save_entry(bench, params, meta, root)


# ---- imported parameters -----------------------------------------------------------------------
def _array(data: dict[str, Any], key: str) -> np.ndarray:
    try:
        arr = np.asarray(data[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise FieldError(key, "must be an array of numbers") from None
    if arr.size == 0:
        raise FieldError(key, "is empty")
    if not np.isfinite(arr).all():
        raise FieldError(key, "must be finite (no NaN or infinity)")
    while arr.ndim > 2 and arr.shape[0] == 1:  # tinyBenchmarks keeps [1, dims, items]
        arr = arr[0]
    if arr.ndim > 2:
        raise FieldError(key, f"must have at most 2 dimensions, got shape {list(np.shape(data[key]))}")
    return arr


def parse_params(data: Any, bench: Benchmark) -> tuple[ItemParams, dict[str, Any]]:
    """tinyBenchmarks-style ``A``/``B``/``item_ids`` (or our own ItemParams JSON), validated and
    put in the benchmark's item order; also the metadata it carries (model, rows)."""
    if not isinstance(data, dict):
        raise FieldError("body", "parameters are an object with A, B and item_ids")
    if data.get("format") == FORMAT:
        try:
            p = ItemParams.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise FieldError("body", f"not a valid item parameter file ({e})") from None
        if p.item_ids is None:
            raise FieldError("item_ids", "required: one id per item, as in the benchmark")
        a, b, ids, model, rows = p.a, p.b, p.item_ids, p.model, p.n_rows
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise FieldError("a", "must be finite (no NaN or infinity)")
    else:
        for key in ("A", "B", "item_ids"):
            if key not in data:
                raise FieldError(key, f"required (found {sorted(map(str, data))[:8]})")
        raw_ids = data["item_ids"]
        if isinstance(raw_ids, np.ndarray):
            raw_ids = raw_ids.reshape(-1).tolist()
        if not isinstance(raw_ids, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                    for x in raw_ids):
            raise FieldError("item_ids", "must be a list of strings")
        ids = [str(x) for x in raw_ids]
        n = len(ids)
        a, b = _array(data, "A"), _array(data, "B")
        if a.ndim == 1:
            a = a[:, None]
        elif a.shape[1] == n and a.shape[0] != n:
            a = a.T  # [dims, items] -> [items, dims]
        elif a.shape[0] != n:
            raise FieldError("A", f"shape {list(a.shape)} has no axis of {n} items (item_ids)")
        elif a.shape[1] == n and n > 1:
            raise FieldError("A", f"shape {list(a.shape)}: cannot tell items from dimensions")
        if b.ndim == 2:  # tinyBenchmarks: one difficulty per dimension, logit = sum_d (a_d theta_d - b_d)
            if b.shape[1] == n and b.shape[0] != n:
                b = b.sum(axis=0)
            elif b.shape[0] == n:
                b = b.sum(axis=1)
            else:
                raise FieldError("B", f"shape {list(b.shape)} has no axis of {n} items (item_ids)")
        if b.shape[0] != n:
            raise FieldError("B", f"{b.shape[0]} difficulties for {n} items (item_ids)")
        model = str(data.get("model") or ("2pl" if a.shape[1] == 1 else "multidim_2pl"))
        rows = data.get("rows", data.get("n_rows", 0))
        rows = int(rows) if isinstance(rows, (int, float)) and not isinstance(rows, bool) and rows >= 0 else 0
    if model not in ("1pl", "2pl", "multidim_2pl"):
        raise FieldError("model", f"{_short(model)}: one of 1pl, 2pl, multidim_2pl")
    order = align(ids, bench, what="item id")
    params = ItemParams(a[order], b[order], model, rows, list(bench.ids),
                        {"imported": True})
    return params, {"rows": rows}


def read_params(path: str | os.PathLike, bench: Benchmark) -> tuple[ItemParams, dict[str, Any]]:
    """A parameter file: .json or .npz (see `parse_params`)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        data: Any = _npz(path)
    else:
        try:
            data = json.loads(path.read_text(), parse_constant=lambda c: float("nan"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path.name}: not valid JSON ({str(e).splitlines()[0]})") from None
    return parse_params(data, bench)


def import_params(bench: Benchmark, data: Any, *, file: str | None = None, root: Path | None = None) -> StoredParams:
    """Validates imported parameters (a parsed JSON object or NPZ arrays) and stores them."""
    params, extra = parse_params(data, bench)
    return save_entry(bench, params, {"source": "imported", "rows": extra["rows"], "file": file}, root)
