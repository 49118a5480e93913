"""Streams every tensor of the base through a merge method into a new HF model folder.

Peak memory is one float32 tensor per input model plus the base's and the output's: each
parameter is read (memory-mapped), turned into task vectors, merged on the chosen device
and appended to its shard before the next one is read. Inputs are checked before any work
starts, and the output appears only when complete (see `checkpoint.CheckpointWriter`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from core.devices import DTYPES, resolve_device
from core.errors import CheckpointError
from core.hashing import content_hash
from core.hooks import NO_HOOKS, Hooks
from core.validation import strict_spec

from .card import model_card
from .checkpoint import CheckpointWriter
from .methods import MethodParams, get_method
from .spec import MergeSpec
from .task_vectors import open_inputs


def merged_tensors(reader, sources, method: str, params: MethodParams | Callable[[str], MethodParams],
                   device: torch.device, names=None):
    """Yields (name, merged float32 tensor on `device`) in the order of `names`."""
    fn = get_method(method).fn
    for name in names if names is not None else reader.names():
        info = reader.info(name)
        if not info.dtype.is_floating_point:
            yield name, reader.get(name, device)
            continue
        base = reader.get(name, device, torch.float32)
        deltas = [s.delta(name, base) for s in sources]
        p = params(name) if callable(params) else params
        try:
            merged = fn(base, deltas, p, name)
        except RuntimeError:  # e.g. an SVD that does not converge on NaN
            culprit = non_finite_input(base, deltas)
            if culprit is None:
                raise
            raise CheckpointError(f"{name}: the merge has NaN or infinite values, {culprit}") from None
        if not all_finite(merged):
            raise CheckpointError(f"{name}: the merge has NaN or infinite values, "
                                  f"{non_finite_input(base, deltas) or 'from the method on finite inputs'}")
        yield name, merged


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. A sum is a fast screen (a vectorized reduction, 30x cheaper than
    an elementwise test, and NaN or infinity in any element makes it non-finite); only a sum that
    is not finite, NaN or an overflow of finite values, is checked element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_input(base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> str | None:
    """Which input holds non-finite values, if any (a checkpoint is never written with them)."""
    if not all_finite(base):
        return "from the base"
    bad = [i for i, d in enumerate(deltas) if not all_finite(d)]
    return f"from models[{bad[0]}]" if bad else None


def check_output(out_dir: str | os.PathLike, spec: MergeSpec, overwrite: bool) -> None:
    """Refuses, before any work, an existing output folder unless `overwrite`, and an output folder
    that is, or holds, one of the spec's inputs: writing it would replace the models being merged."""
    if Path(out_dir).exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: output folder exists (choose another or allow overwrite: --overwrite)")
    out = Path(out_dir).resolve()
    named = [("base", spec.base)] + [(f"models[{i}].path", m.path) for i, m in enumerate(spec.models)] + [
        (f"models[{i}].train", m.train) for i, m in enumerate(spec.models)] + [
        (f"params.{k}", spec.params.get(k)) for k in ("data", "spec") if isinstance(spec.params.get(k), (str, Path))]
    for field, p in named:
        if p is not None and Path(p).resolve().is_relative_to(out):
            raise CheckpointError(f"{out_dir}: the output would replace {field} ({p}); choose another folder")


def merge(spec: MergeSpec | Mapping[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False,
          progress: bool = True, params: Callable[[str], MethodParams] | None = None,
          card_extra: Mapping[str, Any] | None = None, hooks: Hooks = NO_HOOKS) -> Path:
    """Merges the spec's models into a new HF folder at `out_dir` and returns its path.

    `params`, when given, supplies per-tensor parameters (the search uses it for per-block
    genomes); otherwise the spec's parameters apply to every tensor. `card_extra` adds
    entries to the recipe in the model card; `progress` shows a bar. `hooks` get progress
    events (`{"type": "progress", "tensors", "total", "fraction"}`, at most every 0.5 s) and
    are asked between tensors whether to stop (`core.hooks.Stopped`; nothing is written then).
    A `model` or `training` method runs whole (its `run`): ATM (`merging.atm.run_atm`) reports
    its steps and, stopped, resumes on a later call with the same spec and `out_dir`.
    """
    spec = strict_spec(MergeSpec, spec)
    check_output(out_dir, spec, overwrite)
    method = get_method(spec.method)
    if method.run is not None:  # a whole-model or training method runs whole
        return method.run(spec, out_dir, overwrite=overwrite, progress=progress, card_extra=dict(card_extra or {}),
                          hooks=hooks)
    out = Path(out_dir)
    reader, sources = open_inputs(spec.base, [m.path for m in spec.models])
    device = resolve_device(spec.device)
    dtype = DTYPES[spec.output.dtype] if spec.output.dtype else None
    hashes = {str(p): content_hash(p) for p in [spec.base, *[m.path for m in spec.models]]}
    p = params or spec.method_params()
    infos = {n: reader.info(n) for n in reader.names()}
    last = 0.0
    with CheckpointWriter(out, infos, dtype, spec.output.max_shard_size, overwrite) as writer:
        stream = merged_tensors(reader, sources, spec.method, p, device, writer.expected)
        for done, (name, tensor) in enumerate(tqdm(stream, total=len(infos), desc=f"merge ({spec.method})",
                                                   unit="tensor", disable=not progress, leave=False), 1):
            writer.write(name, tensor)
            if time.monotonic() - last > 0.5 or done == len(infos):
                last = time.monotonic()
                hooks.emit({"type": "progress", "tensors": done, "total": len(infos),
                            "fraction": round(done / len(infos), 4)})
            hooks.check()
        return writer.finish(side_files_from=spec.base, card=model_card(spec, hashes, card_extra))
