"""Candidates materialized in memory: one resident model, rewritten in place per genome.

What stays resident for a job (`evolve.plan` counts each of these from headers alone):
- the model, in the evaluation dtype (bfloat16 on CUDA by default), built without weights
  and written by the first candidate;
- the task vectors tau_i, in a store (`merging.store`: dense in the evaluation dtype's
  precision, lowrank or sparse), after the method's parameter-free `prepare` (TSV's SVDs);
- for TIES, each stored vector's magnitude histogram (`merging.selection.CachedChunks`, 128 KB a
  matrix, in one block): its trims are found per candidate by a streaming selection that starts
  from it (no rank per entry);
- nothing else: the base is read from its checkpoint, tensor by tensor, when a candidate is
  materialized fresh.

A candidate is written tensor by tensor, and large tensors in runs of rows (`merging.chunks`:
`CHUNK` elements, for `chunkable` methods), merged in float32 and cast into the model: the
working set is a few chunks, not a float32 copy of the model.

Fresh or incremental. A fresh candidate is theta = base + f(tau; p), exactly what the
streaming merge writes (bit for bit with a float32 model and store). Between fresh ones
(`reanchor_every`), a candidate is written as an update of the previous one:
theta += f(tau; p') - f(tau; p), computed in float32 from the store; for linear methods
(`coefficients`) in one pass, sum_i (c_i' - c_i) x_i. Each update rounds theta to the
model dtype once, so the drift from a fresh materialization is a random walk of rounding
errors; re-anchoring bounds it (tests/test_materialize.py measures it over 1,000
candidates). Incremental updates pay off where reading the base costs more than the
arithmetic: a model on a GPU whose base lies on the host's disk.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from core.devices import DTYPES, resolve_device, resolve_dtype
from core.errors import CheckpointError
from merging.chunks import CHUNK, row_chunks, run_kwargs
from merging.engine import all_finite, merged_tensors
from merging.methods import MethodParams, get_method
from merging.selection import HI_BINS, CachedChunks, by_radix
from merging.store import StoredTensor, StoreSettings
from merging.task_vectors import open_inputs


def tree_map(fn: Callable[[Any], Any], obj: Any, leaf: type = torch.Tensor) -> Any:
    """`obj` with fn applied to every `leaf` inside its lists, tuples and named tuples."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(tree_map(fn, x, leaf) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, x, leaf) for x in obj)
    return obj


def tree_leaves(obj: Any, leaf: type) -> list:
    out: list = []
    tree_map(out.append, obj, leaf)
    return out


def store_settings_for(dtype: torch.dtype, kind: str = "dense", rank: float = 0.1, density: float = 0.1) -> StoreSettings:
    """The store for a model of `dtype`: float32 task vectors for a float32 model (exact), else bfloat16."""
    return StoreSettings(kind, torch.float32 if dtype == torch.float32 else torch.bfloat16, rank, density)


def working_set(method, numel: int, n_models: int, read_size: int) -> tuple[int, int]:
    """Transient bytes on the merge device for a tensor of `numel` entries (the largest one):
    (building the store, writing a candidate). Building holds the base and one task vector in
    float32 (all N for a method with `prepare`, twice over: TSV's updates), a read buffer in the
    checkpoint's dtype and what making a compressed form takes (12 B an entry: the magnitude
    histogram, the keep mask and its packing). Writing holds, for a `chunkable` method (every
    registered one today), the base's rows as read and 6 float32 chunks beside the N stored runs,
    plus N more for a method that is not linear (TIES' trimmed and DARE's dropped copies); the
    whole tensor, (2N + 8) float32 copies and the base as read, otherwise."""
    held = 2 * n_models if method.prepare else 1
    build = numel * (4 + 4 * held + read_size + 12)
    if method.chunkable:
        copies = n_models + 6 if method.coefficients else 2 * n_models + 6
        write = (read_size + copies * 4) * min(numel, CHUNK)
    else:
        write = numel * read_size + (2 * n_models + 8) * 4 * numel
    return build, write


@functools.cache
def _libc() -> Any:
    """glibc, loaded once (a candidate's materialization trims the heap through it)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def _trim_heap() -> None:
    """Gives the heap's free pages back to the system (glibc's malloc_trim): the heap keeps what
    the store build and a candidate's chunks freed, up to the 1 GB trim threshold below, and a job's
    memory would count it (60-110 MB on a 33 M model with 3 fine-tunes)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _return_freed_memory() -> None:
    """Fixes glibc's mmap threshold at 32 MB (and its trim threshold at 1 GB): by default it raises
    the threshold after each large free, so the many tensors a store build frees land in the heap
    between the store's own, fragmented, and stay counted in the process's memory (0.3 GB of
    1.4 GB on a 200 M model with 3 fine-tunes). Fixed, tensors over 32 MB are mapped and given
    back when freed, while the per-chunk buffers (4 MB) are reused from the heap without
    faulting pages in again (a 1 MB threshold made every chunk a fresh mapping: 2.5x slower)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


class ResidentMerge:
    """Holds one job's task-vector store and model; `materialize` writes a candidate into the model."""

    def __init__(self, base: str | os.PathLike, models: Sequence[str | os.PathLike], method: str,
                 device: str = "auto", *, dtype: str = "auto", store: StoreSettings | str | None = None,
                 store_device: str | None = None, reanchor_every: int | None = None, tokenizer: str | None = None):
        _return_freed_memory()
        self.method = get_method(method)
        self.device = resolve_device(device)
        self.dtype = DTYPES[resolve_dtype(dtype, self.device)]
        if store is None or isinstance(store, str):
            store = store_settings_for(self.dtype, store or "dense")
        self.settings = store
        self.store_device = torch.device(store_device) if store_device else self.device
        self.reanchor_every = reanchor_every or (16 if self.device.type == "cuda" else 1)
        self.reader, self.sources = open_inputs(base, list(models), tokenizer)
        self.names = [n for n in self.reader.names() if self.reader.info(n).dtype.is_floating_point]
        _check_fits_class(base, self.reader.names())  # on the meta device, before anything is read
        self.stored = self._build_store()  # before the model: setup's float32 copies never meet it
        _trim_heap()
        self.model = _empty_model(base, self.dtype, self.device)
        params = self.model.state_dict()
        in_model = model_names(self.model, self.reader.names())
        self.targets = {n: params[in_model[n]] for n in self.names}
        with torch.no_grad():
            for n in self.reader.names():
                if n not in self.targets:
                    params[in_model[n]].copy_(self.reader.get(n, self.device))
        self.n_layers = getattr(self.model.config, "num_hidden_layers", 1)
        self._last: MethodParams | Callable[[str], MethodParams] | None = None
        self._last_ctx: dict[str, Any] = {}
        self._context_chunks: dict[str, list[CachedChunks]] = {}
        self._histogram_rows: Iterator[torch.Tensor] | None = None
        self._since_anchor = 0

    @torch.no_grad()
    def _build_store(self) -> dict[str, Any]:
        """Each tensor's task vectors, checked finite, prepared and stored. A method without
        `prepare` stores them one at a time; TSV prepares all of a tensor's at once, from what a
        lossy store gives back (so that its factors describe the stored vectors)."""
        stored: dict[str, Any] = {}
        for n in self.names:
            b = self.reader.get(n, self.device, torch.float32)
            self._check_finite(n, b, "the base")
            if self.method.prepare is None:
                parts = []
                for i, s in enumerate(self.sources):
                    d = s.delta(n, b)
                    self._check_finite(n, d, f"models[{i}]")
                    parts.append(StoredTensor.make(d, n, self.settings, self.store_device))
                    del d
                stored[n] = parts
                continue
            deltas = [s.delta(n, b) for s in self.sources]
            for i, d in enumerate(deltas):
                self._check_finite(n, d, f"models[{i}]")
            del b
            if self.settings.kind != "dense":
                deltas = [StoredTensor.make(d, n, self.settings).get() for d in deltas]
            prep = self.method.prepare(deltas, n)
            del deltas
            stored[n] = tree_map(lambda t: StoredTensor.make(t, n, self.settings, self.store_device), prep)
        return stored

    @staticmethod
    def _check_finite(n: str, t: torch.Tensor, source: str) -> None:
        if not all_finite(t):
            raise CheckpointError(f"{n}: NaN or infinite weights from {source}; a merge of them would be too")

    @property
    def cache_bytes(self) -> int:
        """Bytes of the task-vector store (the resident model aside)."""
        return sum(s.nbytes for v in self.stored.values() for s in tree_leaves(v, StoredTensor))

    @property
    def model_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.targets.values())

    @property
    def lossless(self) -> bool:
        """Whether the store holds the task vectors exactly as the streaming merge computes them."""
        return self.settings.kind == "dense" and self.settings.dtype == torch.float32

    @torch.no_grad()
    def materialize(self, params: MethodParams | Callable[[str], MethodParams], fresh: bool | None = None,
                    exact: bool = False) -> torch.nn.Module:
        """Writes the merge with these parameters into the resident model and returns it.

        Fresh from the base every `reanchor_every` candidates (and whenever `fresh`), else as an
        update of the previous candidate. `exact`: the merge of the input checkpoints themselves,
        streamed from disk as `merging.merge` computes it (what an export writes), for a store
        that keeps less than that; a final check measures this model."""
        if exact and not self.lossless:
            for n, merged in merged_tensors(self.reader, self.sources, self.method.name, params, self.device, self.names):
                self.targets[n].copy_(merged)
            self._last = None  # the store's candidates continue from a fresh one
        else:
            if self._last is None or exact:
                fresh = True
            elif fresh is None:
                fresh = self._since_anchor + 1 >= self.reanchor_every
            for n in self.names:
                p = params(n) if callable(params) else params
                old = None if fresh else (self._last(n) if callable(self._last) else self._last)
                self._write(n, p, old)
            self._last, self._since_anchor = params, 0 if fresh else self._since_anchor + 1
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so that a caller's timing covers the work
        return self.model

    def _chunks(self, stored: Any, shape: Sequence[int]) -> Iterator[tuple[int, int, Any]]:
        """(a, b, prepared form of rows a..b in float32 on the device) over the tensor's row runs."""
        spans = row_chunks(shape, self.method.chunkable)
        leaves = tree_leaves(stored, StoredTensor)
        iters = [leaf.chunks(spans, self.device) for leaf in leaves]
        for a, b in spans:
            parts = iter([next(it) for it in iters])
            yield a, b, tree_map(lambda _: next(parts), stored, StoredTensor)

    def _context(self, n: str, stored: Any, p: MethodParams) -> dict:
        if self.method.context is None:
            return {}
        leaves = tree_leaves(stored, StoredTensor)
        if n not in self._context_chunks:  # the stored vectors never change: their histograms are kept
            spans = row_chunks(leaves[0].shape, True)
            self._context_chunks[n] = [
                CachedChunks(lambda s=s: (c.reshape(-1) for c in s.chunks(spans, self.device)),
                             bfloat16=s.form == "dense" and s.parts[0].dtype == torch.bfloat16,
                             out=self._histogram_row() if by_radix(math.prod(s.shape)) else None) for s in leaves]
        return {"ctx": self.method.context(self._context_chunks[n], math.prod(leaves[0].shape), p, n)}

    def _histogram_row(self) -> torch.Tensor:
        """The next row of one int32 block holding every kept magnitude histogram (`plan`'s method state)."""
        if self._histogram_rows is None:
            rows = sum(by_radix(math.prod(s.shape)) for n in self.names for s in tree_leaves(self.stored[n], StoredTensor))
            self._histogram_rows = iter(torch.empty((rows, HI_BINS), dtype=torch.int32))
        return next(self._histogram_rows)

    def _write(self, n: str, p: MethodParams, old: MethodParams | None) -> None:
        """Tensor `n` of the candidate with parameters `p`: fresh from the base when `old` is None,
        else as the update from the candidate with parameters `old`, run of rows by run of rows."""
        target, stored, fn = self.targets[n], self.stored[n], self.method.fn
        rows = target.view(1) if target.dim() == 0 else target
        per_row = math.prod(rows.shape[1:])
        ctx = self._context(n, stored, p)
        coeffs = None
        if old is not None and self.method.coefficients is not None:
            coeffs = [a - b for a, b in zip(self.method.coefficients(p, stored), self.method.coefficients(old, stored))]
        zero = torch.zeros((), device=self.device)
        for a, b, x in self._chunks(stored, rows.shape):
            kw = run_kwargs(self.method, ctx, a * per_row)
            if old is None:
                base = self.reader.get_rows(n, a, b, self.device) if target.dim() else self.reader.get(n, self.device).view(1)
                out = fn(base.float(), x, p, n, **kw)
                del base
            elif coeffs is not None:
                out = rows[a:b].float()
                for c, v in zip(coeffs, tree_leaves(x, torch.Tensor)):
                    out.add_(v, alpha=c)
            else:
                old_kw = run_kwargs(self.method, self._last_ctx.get(n, {}), a * per_row)
                out = rows[a:b].float().add_(fn(zero, x, p, n, **kw)).sub_(fn(zero, x, old, n, **old_kw))
            rows[a:b].copy_(out)
            del x, out  # before the next chunk's are made
        if ctx:
            self._last_ctx[n] = ctx

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.targets.items()}


def _empty_model(base: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The base's model class in `dtype` on `device`, its weights allocated but not initialized
    (the first candidate writes them; untouched pages cost no memory), buffers (rotary tables) as
    the class computes them, tied weights tied."""
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(base)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def model_names(model, names: Sequence[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the name of that tensor in `model` (transformers >= 5 renames some on
    load, e.g. GPT-NeoX's embed_out -> lm_head); a conversion that fuses tensors is refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint names are module names
        return {n: n for n in names}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    out = {}
    for n in names:
        renamed, converter = rename_source_key(n, renamings, converters, model.base_model_prefix, state)
        if converter is not None:
            raise CheckpointError(f"checkpoint tensor {n} is converted (fused) on load by transformers; "
                                  "an evolve job needs one model tensor per checkpoint tensor")
        out[n] = renamed
    return out


def _check_fits_class(base: str | os.PathLike, names: Sequence[str]) -> None:
    """The checkpoint's tensors are the model class's parameters, each one written (directly or
    through a tied one): an uninitialized weight would otherwise go unnoticed."""
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    names = list(model_names(model, names).values())
    have = set(names)
    state = model.state_dict()
    extra = [n for n in names if n not in state]
    if extra:
        raise CheckpointError(f"{base}: checkpoint tensor {extra[0]} is not a parameter of the model class")
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if name not in have and canonical not in have:
            raise CheckpointError(f"{base}: the checkpoint has no tensor {name} (nor one tied to it)")
