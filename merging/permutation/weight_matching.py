"""Pairwise weight matching (Git Re-Basin, Ainsworth, Hayase and Srinivasa, ICLR 2023, Algorithm 1).

`weight_matching(spec, A, B)` finds permutations pi (one per group of the spec) of model B's
units that maximize the summed inner product of the weights,

    sum_params < W_A, pi(W_B) >_F                                     (eq. 4 of the paper)

by coordinate descent: one group at a time (in a random order each sweep), with every
other group's permutation held fixed, the objective is linear in that group's permutation
matrix, so the best one is a linear assignment problem on the similarity matrix
C[k, m] = sum over the group's (param, axis) of <A's unit k, B's unit m> (B's other axes
already permuted), solved exactly with `scipy.optimize.linear_sum_assignment`. Sweeps stop
when no group improves the objective by more than 1e-12 (`tol`) or after `max_iter`
sweeps (100). Identity start, random group order per sweep, max_iter 100 and the 1e-12
improvement test follow the authors' code (samuela/git-re-basin, `weight_matching.py`).

Every group's similarity is accumulated in float64; the models are read whole (no
streaming): all tensors of both models are in memory on `device`.

Result convention (see `spec`): `perms[g]` is an index tensor, and `permute_state(spec, B,
perms)` is B aligned to A.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .spec import Perms, PermutationSpec, compose, identity_perms, inverse, permute_tensor


def unit_rows(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """`t` as an (n, -1) matrix whose row k holds everything of unit (block) k along `axis`."""
    return torch.movedim(t, axis, 0).reshape(n, -1)


def lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation p maximizing sum_k score[k, p[k]] (linear assignment, exact)."""
    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out).to(score.device)


def similarity_matrix(spec: PermutationSpec, group: str, A: Mapping[str, torch.Tensor],
                      B: Mapping[str, torch.Tensor], perms: Perms) -> torch.Tensor:
    """C[k, m] = sum over the group's axes of <A's unit k, B's unit m>, B's other axes permuted."""
    n = spec.sizes[group]
    C = None
    for name, ax in spec.groups[group]:
        b = permute_tensor(B[name], spec.axes[name], perms, spec.sizes, skip=group)
        term = unit_rows(A[name], ax, n) @ unit_rows(b, ax, n).T
        C = term if C is None else C + term
    return C


def objective(spec: PermutationSpec, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
              perms: Perms) -> float:
    """sum over the spec's parameters of <W_A, pi(W_B)>."""
    return float(sum((A[n].double() * permute_tensor(B[n].double(), spec.axes[n], perms, spec.sizes)).sum()
                     for n in spec.axes))


def weight_matching(spec: PermutationSpec, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, tol: float = 1e-12,
                    device: str | torch.device = "cpu", init: Perms | None = None) -> Perms:
    """Permutations of B's units aligning it to A (see the module docstring)."""
    spec.validate(A, "model A")
    spec.validate(B, "model B")
    A64 = {n: A[n].to(device, torch.float64) for n in spec.axes}
    B64 = {n: B[n].to(device, torch.float64) for n in spec.axes}
    perms = {g: p.to(device) for g, p in (init or identity_perms(spec, device)).items()}
    names = list(spec.sizes)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for gi in rng.permutation(len(names)):
            g = names[gi]
            C = similarity_matrix(spec, g, A64, B64, perms)
            new = lap(C)
            ar = torch.arange(len(new), device=C.device)
            gain = float(C[ar, new].sum() - C[ar, perms[g]].sum())
            if gain > tol:
                progress = True
            perms[g] = new
        if not progress:
            break
    return {g: p.cpu() for g, p in perms.items()}


def relative(to: Perms, frm: Perms) -> Perms:
    """Maps from model `frm`'s units to model `to`'s, for universe permutations (x -> universe).

    With U = p_i(W_i) for every model, model j aligned to model i is `frm[inverse(to)]`
    applied to W_j; so the maps of any cycle compose to the identity by construction.
    """
    return {g: compose(frm[g], inverse(to[g])) for g in to}


def cycle_error(map_ab: Perms, map_bc: Perms, map_ca: Perms) -> float:
    """Share of units not returned to themselves by the cycle a -> c -> b -> a.

    `map_xy` aligns model y to model x (index arrays, as `weight_matching` returns them);
    the composition is the identity exactly when the three maps are cycle-consistent.
    """
    moved = total = 0
    for g in map_ab:
        cyc = map_ca[g][map_bc[g][map_ab[g]]]
        moved += int((cyc != torch.arange(len(cyc))).sum())
        total += len(cyc)
    return moved / max(total, 1)
