"""Streams every tensor of the base through a merge method into a new HF model folder.

Memory is a few tensors, not a model: each parameter is read, turned into float32 task
vectors, merged on the chosen device and appended to its shard, with reads of the next
tensors and writes of the previous ones overlapping the merge (`merge`'s `pipeline` states
the bound). Inputs are checked before any work starts, and the output appears only when
complete (see `checkpoint.CheckpointWriter`).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from core.devices import DTYPES, resolve_device, torch_threads, usable_cores
from core.errors import CheckpointError
from core.hashing import content_hash
from core.hooks import NO_HOOKS, Hooks
from core.pipeline import Behind, ahead
from core.validation import strict_spec

from .card import model_card
from .checkpoint import CheckpointWriter
from .chunks import merge_rows, row_chunks
from .methods import MethodParams, get_method
from .spec import MergeSpec
from .task_vectors import open_inputs


def merged_tensors(reader, sources, method: str, params: MethodParams | Callable[[str], MethodParams],
                   device: torch.device, names=None, prefetch: int = 1, union=None):
    """Yields (name, merged float32 tensor on `device`) in the order of `names`; the next
    `prefetch` tensors' inputs are read in a background thread while the current one is merged
    (`core.pipeline.ahead`; 0: no read-ahead). A chunkable method's large tensors stay in their
    stored dtype and become float32 task vectors a run of rows at a time (`merging.chunks`)
    when it has no `context`; other methods get whole float32 task vectors.
    `union`: a `merging.vocab.UnionVocab` whose new tokens extend the vocabulary tensors."""
    m = get_method(method)

    # inputs made float32 run by run (merging.chunks); not for a method with a context (TIES' trims
    # pass over whole task vectors three times: remaking them each pass cost 15-20 % more time)
    by_rows = m.chunkable and m.prepare is None and m.context is None

    def load(name: str):
        info = reader.info(name)
        if not info.dtype.is_floating_point:
            return reader.get(name, device), None
        if by_rows and len(row_chunks(info.shape, True)) > 1 and (union is None or name not in union.names):
            base = reader.get(name, device)
            return base, [s.delta_rows(name, base) for s in sources]
        base = reader.get(name, device, torch.float32)
        if union is not None and name in union.names:
            p = params(name) if callable(params) else params
            base = union.extend_base(name, base, [getattr(s, "reader", None) for s in sources],
                                     p.per_model("weights", len(sources), 1.0))
        return base, [s.delta(name, base) for s in sources]

    for name, (base, deltas) in ahead(names if names is not None else reader.names(), load, prefetch):
        if deltas is None:
            yield name, base
            continue
        p = params(name) if callable(params) else params
        try:
            merged = merge_rows(m, base, deltas, p, name)
        except RuntimeError:  # e.g. an SVD that does not converge on NaN
            culprit = non_finite_input(base, deltas)
            if culprit is None:
                raise
            raise CheckpointError(f"{name}: the merge has NaN or infinite values, {culprit}") from None
        if not all_finite(merged):
            raise CheckpointError(f"{name}: the merge has NaN or infinite values, "
                                  f"{non_finite_input(base, deltas) or 'from the method on finite inputs'}")
        del base, deltas  # not held while the next tensor is read
        yield name, merged
        del merged


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t`. A sum is a fast screen (a vectorized reduction, 30x cheaper than
    an elementwise test, and NaN or infinity in any element makes it non-finite); only a sum that
    is not finite, NaN or an overflow of finite values, is checked element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_input(base: torch.Tensor, deltas: Sequence[torch.Tensor]) -> str | None:
    """Which input holds non-finite values, if any (a checkpoint is never written with them);
    a task vector may be a `merging.chunks.RowFn`."""
    if not all_finite(base):
        return "from the base"
    whole = base.float()
    bad = [i for i, d in enumerate(deltas) if not all_finite(d(0, len(whole), whole) if callable(d) else d)]
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
          card_extra: Mapping[str, Any] | None = None, hooks: Hooks = NO_HOOKS, threads: int | None = None,
          pipeline: int | None = None) -> Path:
    """Merges the spec's models into a new HF folder at `out_dir` and returns its path.

    `params`, when given, supplies per-tensor parameters (the search uses it for per-block
    genomes); otherwise the spec's parameters apply to every tensor. `card_extra` adds
    entries to the recipe in the model card; `progress` shows a bar. `hooks` get progress
    events (`{"type": "progress", "tensors", "total", "fraction"}`, at most every 0.5 s) and
    are asked between tensors whether to stop (`core.hooks.Stopped`; nothing is written then).
    A `model` or `training` method runs whole (its `run`): ATM (`merging.atm.run_atm`) reports
    its steps and, stopped, resumes on a later call with the same spec and `out_dir`.

    Reading, merging and writing overlap (`core.pipeline`): while tensor t is merged, the
    inputs of the next `pipeline` tensors are read and the merged tensors before t are cast
    and written, each stage in its own thread. Memory: at most pipeline + 1 tensors' inputs
    (the base's and one per model: as stored for a chunkable, context-free method's tensors
    larger than `merging.chunks.CHUNK`, else float32 task vectors) and pipeline + 1 merged float32 outputs,
    next to the one tensor of each kind the plain loop holds (pipeline 0), and a chunkable
    method's few float32 runs. Default: 1, and 0 for a
    method with a `prepare` step (TSV: its SVDs keep every core busy, and the pipeline's threads
    slowed them 1.5x) or on a machine of at most 2 cores, where the pipeline's threads compete with
    the method's (at 0.5 B on 2 cores the plain loop was faster for 4 of 5 methods, DARE by 35-40 %;
    bench/README.md). `threads`: torch's intra-op threads for the methods'
    arithmetic (default: as torch is set, all cores unless OMP_NUM_THREADS says otherwise).
    The output is the same bit for bit at any `pipeline`, and at any `threads` for every method
    but TSV, whose SVDs (LAPACK) round differently with the number of threads.
    """
    spec = strict_spec(MergeSpec, spec)
    check_output(out_dir, spec, overwrite)
    method = get_method(spec.method)
    if method.run is not None:  # a whole-model or training method runs whole
        return method.run(spec, out_dir, overwrite=overwrite, progress=progress, card_extra=dict(card_extra or {}),
                          hooks=hooks)
    if pipeline is None:
        pipeline = 0 if method.prepare is not None or usable_cores() <= 2 else 1
    with torch_threads(threads):
        return _stream(spec, Path(out_dir), overwrite, progress, params, card_extra, hooks, pipeline)


def _stream(spec: MergeSpec, out: Path, overwrite: bool, progress: bool, params, card_extra, hooks: Hooks,
            pipeline: int) -> Path:
    reader, sources = open_inputs(spec.base, [m.path for m in spec.models], spec.tokenizer)
    device = resolve_device(spec.device)
    dtype = DTYPES[spec.output.dtype] if spec.output.dtype else None
    inputs = [spec.base, *[m.path for m in spec.models]]
    p = params or spec.method_params()
    infos = {n: reader.info(n) for n in reader.names()}
    union = union_vocab(spec, sources, infos) if spec.tokenizer == "union" else None
    last = 0.0
    # the card's input hashes (a pass over every input's bytes, remembered per machine) overlap the merge
    with ThreadPoolExecutor(1, thread_name_prefix="hash") as pool, \
            CheckpointWriter(out, infos, dtype, spec.output.max_shard_size, overwrite) as writer:
        hashes = pool.map(content_hash, inputs)
        stream = merged_tensors(reader, sources, spec.method, p, device, writer.expected, pipeline, union)
        with closing(stream), Behind(lambda item: writer.write(*item), pipeline) as behind:
            for done, item in enumerate(tqdm(stream, total=len(infos), desc=f"merge ({spec.method})",
                                             unit="tensor", disable=not progress, leave=False), 1):
                behind.put(item)
                del item  # the writer holds it now
                if time.monotonic() - last > 0.5 or done == len(infos):
                    last = time.monotonic()
                    hooks.emit({"type": "progress", "tensors": done, "total": len(infos),
                                "fraction": round(done / len(infos), 4)})
                hooks.check()
        hashes = dict(zip(map(str, inputs), hashes))
        edit = (lambda folder: union.write_files(spec.base, folder)) if union is not None else None
        return writer.finish(side_files_from=spec.base, card=model_card(spec, hashes, card_extra), edit=edit)


def union_vocab(spec: MergeSpec, sources, infos: dict):
    """`tokenizer: union`: the union of the vocabularies (None when every model has the base's);
    `infos` get the vocabulary tensors' new rows, so the output is planned with them."""
    from .checkpoint import TensorInfo
    from .vocab import UnionVocab, vocabularies

    names, v = vocabularies(spec.base, infos, sources, [m.path for m in spec.models])
    if v is None:
        return None
    union = UnionVocab(v)
    union.names = set(names)
    for n in names:
        infos[n] = TensorInfo((union.out_rows, *infos[n].shape[1:]), infos[n].dtype)
    return union
