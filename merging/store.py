"""Compact task-vector stores: the per-job copy of tau_i = theta_i - theta_base that an evolve
job merges many times.

Three kinds, chosen per job (`evaluation.store`), applied per tensor:

- `dense`: the tensor as is, in the store dtype (bfloat16 for a bf16 job, float32 for a
  float32 one, which is exact: what the streaming merge computes).
- `lowrank`: a matrix's best rank-r approximation tau ~ (U_r S_r) V_r^T with
  r = ceil(rank * min(m, n)) (TSV-C, Gargiulo et al. 2025: a layer's task vector keeps most
  of its energy in a few percent of its rank). Factors in the store dtype; found by a
  randomized SVD (Halko et al. 2011, `torch.svd_lowrank`) when r is small next to the matrix.
  Token embeddings stay dense (rows are lookups, not one linear map; as in TSV-M).
- `sparse`: the top `density` fraction of entries by magnitude (ties in index order, as
  TIES' trim), as a packed bitmask (1 bit per entry) and the kept values in index order.
  For TIES at a density at or below the store's, the trim of a sparse tau is the trim of
  the dense one: the store loses nothing that TIES keeps.

1-D tensors (norms, biases) are always dense: they are small and not matrices. A tensor
whose compressed form would not be smaller is kept dense; one that is all zeros (what a LoRA
adapter leaves alone) takes no bytes. `tensor_bytes` gives each kind's
size from a shape alone, so a memory plan can be made from checkpoint headers
(`evolve.plan`); `StoredTensor.nbytes` is the same number for a stored tensor.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from .selection import top_k

StoreKind = Literal["dense", "lowrank", "sparse"]
STORE_KINDS: tuple[str, ...] = ("dense", "lowrank", "sparse")
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class StoreSettings:
    """How task vectors are kept: kind, dtype, and the kind's size knob."""

    kind: StoreKind = "dense"
    dtype: torch.dtype = torch.bfloat16
    rank: float = 0.1  # lowrank: fraction of min(m, n) kept
    density: float = 0.1  # sparse: fraction of entries kept

    def __post_init__(self):
        if self.kind not in STORE_KINDS:
            raise ValueError(f"store kind must be one of {STORE_KINDS}, got {self.kind!r}")
        for field in ("rank", "density"):
            if not 0.0 < getattr(self, field) <= 1.0:
                raise ValueError(f"store {field} must lie in (0, 1], got {getattr(self, field)}")


def _form(shape: Sequence[int], name: str, s: StoreSettings) -> str:
    """The form a tensor of this shape takes under `s`: dense, lowrank or sparse."""
    if s.kind == "dense" or len(shape) != 2 or math.prod(shape) == 0:
        return "dense"
    if s.kind == "lowrank":
        if _EMBEDDING.search(name):
            return "dense"
        m, n = shape
        return "lowrank" if lowrank_rank(shape, s.rank) * (m + n) < m * n else "dense"
    return "sparse" if _sparse_bytes(math.prod(shape), s) < math.prod(shape) * _size(s.dtype) else "dense"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def lowrank_rank(shape: Sequence[int], fraction: float) -> int:
    return max(1, math.ceil(fraction * min(shape)))


def _sparse_bytes(numel: int, s: StoreSettings) -> int:
    return (numel + 7) // 8 + int(s.density * numel) * _size(s.dtype)


def tensor_bytes(shape: Sequence[int], name: str, s: StoreSettings) -> int:
    """Bytes one task vector of this shape takes in the store (what `StoredTensor.nbytes` reports)."""
    numel = math.prod(shape)
    form = _form(shape, name, s)
    if form == "lowrank":
        return lowrank_rank(shape, s.rank) * (shape[0] + shape[1]) * _size(s.dtype)
    if form == "sparse":
        return _sparse_bytes(numel, s)
    return numel * _size(s.dtype)


class StoredTensor:
    """One task vector in its stored form; `get` gives it back as a float32 tensor."""

    __slots__ = ("form", "shape", "parts", "device")

    def __init__(self, form: str, shape: tuple[int, ...], parts: tuple[torch.Tensor, ...], device: torch.device):
        self.form, self.shape, self.parts, self.device = form, shape, parts, device

    @classmethod
    def make(cls, tau: torch.Tensor, name: str, s: StoreSettings, device: torch.device | None = None) -> "StoredTensor":
        device = device or tau.device
        form, shape = _form(tau.shape, name, s), tuple(tau.shape)
        if not tau.any():  # what an adapter leaves alone: nothing to keep
            return cls("zero", shape, (), device)
        if form == "lowrank":
            r = lowrank_rank(shape, s.rank)
            t = tau.float()
            if 4 * r < min(shape):
                u, sv, v = torch.svd_lowrank(t, q=min(r + 8, min(shape)), niter=4)
            else:
                u, sv, vh = torch.linalg.svd(t, full_matrices=False)
                v = vh.T
            parts = ((u[:, :r] * sv[:r]).to(device, s.dtype), v[:, :r].contiguous().to(device, s.dtype))
        elif form == "sparse":
            keep = top_k(tau, int(s.density * tau.numel())).reshape(-1)
            values = tau.reshape(-1)[keep].to(device, s.dtype)
            parts = (_pack_bits(keep).to(device), values)
        else:
            parts = (tau.to(device, s.dtype),)
        return cls(form, shape, parts, device)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def get(self, device: torch.device | None = None) -> torch.Tensor:
        """The task vector as float32 on `device` (default: where it is stored)."""
        device = device or self.device
        if self.form == "zero":
            return torch.zeros(self.shape, dtype=torch.float32, device=device)
        if self.form == "lowrank":
            u, v = (p.to(device, torch.float32, non_blocking=True) for p in self.parts)
            return u @ v.T
        if self.form == "sparse":
            bits, values = (p.to(device, non_blocking=True) for p in self.parts)
            out = torch.zeros(math.prod(self.shape), dtype=torch.float32, device=device)
            out[_unpack_bits(bits, out.numel())] = values.float()
            return out.view(self.shape)
        return self.parts[0].to(device, torch.float32, non_blocking=True)


    def chunks(self, spans: Sequence[tuple[int, int]], device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Rows [a, b) of the task vector for each span, in order, as float32 on `device` (a 1-D or
        0-D tensor comes whole). Spans run over the rows in order, with row counts that keep the
        sparse form's packed bits byte-aligned (multiples of 8 elements)."""
        device = device or self.device
        if len(self.shape) < 2 or len(spans) == 1:
            yield self.get(device)
            return
        per_row = math.prod(self.shape[1:])
        if self.form == "zero":
            for a, b in spans:
                yield torch.zeros((b - a, *self.shape[1:]), dtype=torch.float32, device=device)
        elif self.form == "lowrank":
            u, v = self.parts
            vt = v.to(device, torch.float32, non_blocking=True).T
            for a, b in spans:
                yield u[a:b].to(device, torch.float32, non_blocking=True) @ vt
        elif self.form == "sparse":
            bits, values = self.parts
            start = 0
            for a, b in spans:
                mask = _unpack_bits(bits[a * per_row // 8:(b * per_row + 7) // 8].to(device), (b - a) * per_row)
                kept = int(mask.sum())
                out = torch.zeros((b - a) * per_row, dtype=torch.float32, device=device)
                out[mask] = values[start:start + kept].to(device, torch.float32, non_blocking=True)
                start += kept
                del mask
                yield out.view(b - a, *self.shape[1:])
                del out  # before the next chunk is made: a suspended generator holds its locals
        else:
            for a, b in spans:
                yield self.parts[0][a:b].to(device, torch.float32, non_blocking=True)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return (bits.unsqueeze(1) & _BITS.to(bits.device)).ne(0).view(-1)[:numel]
