"""Task Singular Vectors (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task
Interference in Model Merging").

TSV-C (compression): a layer's task vector is low rank in practice; keeping its top-k
singular triplets, tau ~ U_k diag(S_k) V_k^T, preserves most of its energy
sum(S_k^2) / sum(S^2) at a fraction of the storage.

TSV-M (merging), for every 2-D weight and T tasks:
1. keep k = int(rank / T) singular triplets of each w_i * tau_i (at least 1);
2. stack them: U = [U_1 .. U_T] (m x Tk), S = diag(S_1 .. S_T), V = [V_1 .. V_T] (n x Tk);
3. decorrelate the tasks' subspaces by replacing each stack with its nearest matrix with
   orthonormal columns (orthogonal Procrustes): U = P Sigma Q^T -> U_perp = P Q^T, likewise V;
4. theta = base + alpha * U_perp S V_perp^T.
Weights (default 1) scale each task's singular values in S, after the orthogonalization,
so a weight of 0 removes a task without disturbing the others' subspaces.
Tensors that are not matrices (biases, norms) are averaged over the tasks, as in the
paper's code (`compute_and_sum_svd_mem_reduction`). The paper's code also averages CLIP's
`text_projection` instead of decomposing it; for language models we treat the token
embedding table (`embed_tokens`, `wte`, `word_embeddings`) the same way, because its rows
are independent lookups rather than one linear map, while `lm_head` is a linear map and is
decomposed. alpha defaults to 1.0 as in the paper.
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple, Sequence

import torch
from pydantic import Field

from .registry import MethodParams, register, weighted_sum

_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


class TsvParams(MethodParams):
    alpha: float = Field(1.0, description="scale of the merged update")


def tsv_c(tau: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """TSV-C: the top-k singular triplets (U_k [m,k], S_k [k], V_k [n,k]) of a matrix and the
    fraction of its energy (squared Frobenius norm) they keep."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    return u[:, :k], s[:k], vh[:k].T, kept


def nearest_orthonormal(x: torch.Tensor) -> torch.Tensor:
    """argmin ||Q - X||_F over Q with orthonormal columns (rows if X is wide): P Q^T of X's SVD."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


class TsvFactors(NamedTuple):
    """TSV-M's parameter-free part for one matrix: U_perp [m, Tk], the stacked singular
    values [Tk], V_perp [n, Tk] and the task each singular value came from [Tk]."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    task: torch.Tensor


def tsv_m_factors(taus: Sequence[torch.Tensor]) -> TsvFactors:
    """Steps 1-3 of TSV-M for one matrix."""
    T = len(taus)
    k = max(1, min(taus[0].shape) // T)
    parts = [tsv_c(t, k)[:3] for t in taus]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2] for p in parts], dim=1)
    task = torch.cat([torch.full((len(p[1]),), i, device=s.device) for i, p in enumerate(parts)])
    return TsvFactors(nearest_orthonormal(u), s, nearest_orthonormal(v), task)


def is_matrix(tau: torch.Tensor, name: str) -> bool:
    return tau.dim() == 2 and not _EMBEDDING.search(name)


class TsvUpdates(NamedTuple):
    """TSV-M's prepared form of one tensor: one update per task, merged as scale * sum_i w_i u_i.

    Matrices: u_i = U_perp[:, i] diag(S_i) V_perp[:, i]^T, task i's columns of the decorrelated
    factors (step 4 splits over tasks because weights only scale each task's singular values),
    scale 1; other tensors: u_i = tau_i, scale 1/T (their mean)."""

    updates: tuple[torch.Tensor, ...]
    scale: float


def _updates(deltas: Sequence[torch.Tensor], name: str) -> tuple[Iterator[torch.Tensor], float]:
    """Each task's update (made one at a time) and the scale of their weighted sum."""
    if not is_matrix(deltas[0], name):
        return iter(deltas), 1.0 / len(deltas)
    f = tsv_m_factors(deltas)
    return ((f.u[:, f.task == i] * f.s[f.task == i]) @ f.v[:, f.task == i].T for i in range(len(deltas))), 1.0


def prepare(deltas: Sequence[torch.Tensor], name: str) -> TsvUpdates:
    """The SVDs and orthogonalizations, independent of alpha and weights, folded into one
    update per task, so that a search's candidate costs T scaled additions (as task
    arithmetic) instead of a product of the factors. Memory: T tensors of the layer's shape."""
    updates, scale = _updates(deltas, name)
    return TsvUpdates(tuple(updates), scale)


def _coefficients(p: TsvParams, prepared: TsvUpdates) -> list[float]:
    return [p.alpha * prepared.scale * w for w in p.per_model("weights", len(prepared.updates), 1.0)]


@register("tsv", TsvParams, prepare=prepare, chunkable=True, coefficients=_coefficients,
          space={"weights": (0.0, 1.0), "alpha": (0.3, 1.5)}, sums=True)
def tsv(base: torch.Tensor, deltas, p: TsvParams, name: str) -> torch.Tensor:
    """TSV-M: per-task low-rank SVD, decorrelated singular vectors, summed update.

    Unprepared (streaming) inputs make each task's update only when it is added, so memory stays the
    inputs, the factors and two tensors, and the result equals the prepared path's bit for bit."""
    if isinstance(deltas, TsvUpdates):
        (updates, scale), n = deltas, len(deltas.updates)
    else:
        (updates, scale), n = _updates(deltas, name), len(deltas)
    return base + (p.alpha * scale) * weighted_sum(updates, p.per_model("weights", n, 1.0))
