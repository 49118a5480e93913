"""C2M3: cycle-consistent multi-model merging (Crisostomi, Fumero, Baieri, Bernard and Rodola,
NeurIPS 2024, section 3).

Every model i gets one permutation P_i^g per group g of the spec, mapping its units to a
shared "universe"; the map from model j to model i is P_i^T P_j, so any cycle of pairwise
maps composes to the identity by construction (eq. 5). The permutations maximize the summed
weight similarity of all model pairs in the universe, over all layers at once (eq. 6):

    max_{P}  sum_{i<j} sum_params < P_i(W_i), P_j(W_j) >_F

where P(W) applies, on each axis of W that a group permutes, that group's matrix. The
problem is relaxed to doubly stochastic matrices and solved with Frank-Wolfe (Algorithm 1):
the objective is multilinear in the matrices, its gradient for (i, g) is

    grad_i^g = sum over the group's (param, axis) of R_i V_i^T,

R_i = sum_{j != i} P_j(W_j) (the other models in the universe, as (units, -1) rows) and V_i =
W_i with every axis but g already mapped by P_i; the linear minimization oracle is a linear
assignment on each gradient (`scipy.optimize.linear_sum_assignment`), giving a vertex D; the
step size t in [0, 1] is found by a bounded line search on the objective along S + t (D - S)
(`scipy.optimize.fminbound`, xtol 1e-3, at most 20 evaluations; the objective along the
segment is a polynomial of degree <= 2k for parameters with k permuted axes, so it is fitted
exactly from 2k + 1 evaluations first and the search runs on it); at the end each matrix is
projected to the nearest permutation (a linear assignment on it). The merged model averages
the models in the universe (optionally weighted); it lives in the universe's unit order.

Defaults from the authors' code (crisostomi/cycle-consistent-model-merging at ea1eca7,
`frank_wolfe_sync_matching.py`, `frank_wolfe_matching.initialize_perm_matrices`,
`conf/matching/merger/frank_wolfe_to_universe.yaml`): at most 200 iterations, the line search
above, stopping after 5 consecutive iterations (patience) whose objective improves on the best
one by less than 1e-6, and the "sinkhorn" start: every matrix is the uniform 1/n plus
U(0, 0.01/n) noise, made doubly stochastic by Sinkhorn-Knopp (their merger's default since
Nov 2024; older revisions started from the identity).

Initialization (`init`). Frank-Wolfe on this nonconvex relaxation ends at a stationary point
that depends on the start, and every model moves at once. From the identity or Sinkhorn
start, two models stall in a symmetric soft point: model 0's best vertex is "move to model 1's
order" while model 1's is "move to model 0's", the line search stops half way, and rounding
gives a wrong map. On a shuffled copy of a random-init tiny Llama both starts end far from the
optimum (objective about 160 against 168 after 200 iterations) while pairwise weight
matching recovers the shuffle exactly. The authors' code also offers a "LAP" start (every
model's matrices from weight matching to a reference). We therefore default to
`init="auto"`: run Frank-Wolfe from the authors' Sinkhorn start and from the weight-matching
start (P_0 = I, P_i = weight matching of model i to model 0), round both, and keep the one
with the higher objective (eq. 6 at the permutations; recorded as `final_objective`,
`init`, and `candidates`). This costs two runs; it guarantees that C2M3's objective is never
below what the weight-matching start reaches (so permuted copies, whose global optimum
weight matching finds, are recovered exactly: the test for every architecture), and keeps
the authors' start where it is better. `init` may also be "sinkhorn", "weight_matching" or
"identity" (one run).

Our objective is evaluated as 1/2 (||sum_i U_i||^2 - sum_i ||U_i||^2) per parameter,
which equals the sum over pairs with O(N) instead of O(N^2) work; the arithmetic is float64.

Not streamed: all models are held whole on `device` (plus one n x n matrix per model and
group), unlike the per-tensor methods of `merging.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import fminbound

from .spec import Perms, PermutationSpec, permute_state
from .weight_matching import lap, unit_rows

Soft = dict[str, torch.Tensor]  # group -> n x n doubly stochastic matrix


@dataclass
class C2M3Result:
    perms: list[Perms]                      # per model: its units -> the universe
    objective: list[float] = field(default_factory=list)  # per Frank-Wolfe iteration
    steps: list[float] = field(default_factory=list)
    iterations: int = 0
    final_objective: float = float("nan")   # eq. 6 at the rounded permutations
    init: str = ""                          # the starting point this result came from
    candidates: dict[str, float] = field(default_factory=dict)  # init="auto": each start's final_objective


def _apply_matrix(t: torch.Tensor, axis: int, S: torch.Tensor) -> torch.Tensor:
    n = S.shape[0]
    moved = torch.movedim(t, axis, 0)
    out = (S @ moved.reshape(n, -1)).reshape(moved.shape)
    return torch.movedim(out, 0, axis)


def to_universe(spec: PermutationSpec, W: Mapping[str, torch.Tensor], S: Soft, name: str,
                skip: str | None = None) -> torch.Tensor:
    t = W[name]
    for ax, g in enumerate(spec.axes[name]):
        if g is not None and g != skip:
            t = _apply_matrix(t, ax, S[g])
    return t


def _objective(spec: PermutationSpec, Ws: Sequence[Mapping[str, torch.Tensor]], Ss: Sequence[Soft]) -> float:
    total = 0.0
    for name in spec.axes:
        us = [to_universe(spec, W, S, name) for W, S in zip(Ws, Ss)]
        s = torch.stack(us).sum(0)
        total += 0.5 * float((s * s).sum() - sum((u * u).sum() for u in us))
    return total


def _gradients(spec: PermutationSpec, Ws, Ss) -> list[Soft]:
    grads: list[Soft] = [{g: torch.zeros_like(S[g]) for g in S} for S in Ss]
    for name, axes in spec.axes.items():
        us = [to_universe(spec, W, S, name) for W, S in zip(Ws, Ss)]
        total = torch.stack(us).sum(0)
        for i, (W, S) in enumerate(zip(Ws, Ss)):
            rest = total - us[i]
            for ax, g in enumerate(axes):
                if g is None:
                    continue
                n = spec.sizes[g]
                V = to_universe(spec, W, S, name, skip=g)
                grads[i][g] += unit_rows(rest, ax, n) @ unit_rows(V, ax, n).T
    return grads


def _line_polynomial(spec: PermutationSpec, Ws, Ss, Ds) -> np.ndarray:
    """Coefficients (highest first) of t -> objective(S + t (D - S)).

    Each parameter is multilinear in its groups' matrices, so along the segment the
    objective is a polynomial of degree 2 * (most permuted axes of one parameter); it is
    recovered exactly from that many + 1 evaluations (Chebyshev points on [0, 1]), and the
    authors' bounded line search then runs on the polynomial instead of on the models.
    """
    deg = 2 * max(sum(g is not None for g in a) for a in spec.axes.values())
    ts = 0.5 - 0.5 * np.cos(np.pi * (np.arange(deg + 1) + 0.5) / (deg + 1))
    vals = [_objective(spec, Ws, [{g: S[g] + t * (D[g] - S[g]) for g in S} for S, D in zip(Ss, Ds)]) for t in ts]
    return np.polyfit(ts, vals, deg)


def sinkhorn(M: torch.Tensor, tol: float = 1e-12, max_iter: int = 10_000) -> torch.Tensor:
    """Sinkhorn-Knopp: alternately normalizes the rows and columns of a positive matrix until
    it is doubly stochastic (row and column sums within `tol` of 1)."""
    for _ in range(max_iter):
        M = M / M.sum(1, keepdim=True)
        M = M / M.sum(0, keepdim=True)
        if float((M.sum(1) - 1).abs().max()) < tol:
            break
    return M


INITS = ("auto", "sinkhorn", "weight_matching", "identity")


def initial_matrices(spec: PermutationSpec, models: Sequence[Mapping[str, torch.Tensor]], init: str, seed: int,
                     device) -> list[Soft]:
    """Frank-Wolfe starting points, one dict of n x n matrices per model (see `c2m3`)."""
    sizes = spec.sizes
    if init == "identity":
        return [{g: torch.eye(n, dtype=torch.float64, device=device) for g, n in sizes.items()} for _ in models]
    if init == "sinkhorn":
        gen = torch.Generator().manual_seed(seed)
        return [{g: sinkhorn(torch.full((n, n), 1.0 / n, dtype=torch.float64)
                             + torch.rand(n, n, generator=gen, dtype=torch.float64) * 0.01 / n).to(device)
                 for g, n in sizes.items()} for _ in models]
    if init == "weight_matching":
        from .weight_matching import weight_matching

        out = [{g: torch.eye(n, dtype=torch.float64, device=device) for g, n in sizes.items()}]
        for m in models[1:]:
            # weight_matching gives p with B[p] aligned to A: as a matrix, rows k pick B's unit p[k]
            p = weight_matching(spec, models[0], m, seed=seed, device=device)
            out.append({g: torch.eye(n, dtype=torch.float64, device=device)[p[g].to(device)] for g, n in sizes.items()})
        return out
    raise ValueError(f"params.init: must be one of identity, sinkhorn, weight_matching; got {init!r}")


def c2m3(spec: PermutationSpec, models: Sequence[Mapping[str, torch.Tensor]], max_iter: int = 200,
         patience: int = 5, tol: float = 1e-6, device: str | torch.device = "cpu", init: str = "auto",
         seed: int = 0) -> C2M3Result:
    """Frank-Wolfe synchronized matching of `models` (see the module docstring for `init`)."""
    if len(models) < 2:
        raise ValueError("models: C2M3 needs at least two models")
    if init not in INITS:
        raise ValueError(f"params.init: must be one of {', '.join(INITS)}; got {init!r}")
    for i, m in enumerate(models):
        spec.validate(m, f"models[{i}]")
    Ws = [{n: m[n].to(device, torch.float64) for n in spec.axes} for m in models]
    if init == "auto":
        runs = [_frank_wolfe(spec, Ws, initial_matrices(spec, models, i, seed, device), max_iter, patience, tol)
                for i in ("sinkhorn", "weight_matching")]
        for r, i in zip(runs, ("sinkhorn", "weight_matching")):
            r.init = i
        best = max(runs, key=lambda r: r.final_objective)
        best.candidates = {r.init: r.final_objective for r in runs}
        return best
    res = _frank_wolfe(spec, Ws, initial_matrices(spec, models, init, seed, device), max_iter, patience, tol)
    res.init = init
    return res


def _frank_wolfe(spec: PermutationSpec, Ws, Ss: list[Soft], max_iter: int, patience: int, tol: float) -> C2M3Result:
    device = next(iter(Ws[0].values())).device
    start = None
    if all(bool(((S[g] == 0) | (S[g] == 1)).all()) for S in Ss for g in S):  # a start at permutations
        start = [{g: S[g].argmax(1) for g in S} for S in Ss]
    result = C2M3Result(perms=[])
    best, stall = _objective(spec, Ws, Ss), 0
    for it in range(max_iter):
        grads = _gradients(spec, Ws, Ss)
        Ds = []
        for G in grads:
            D = {}
            for g, Gg in G.items():
                p = lap(Gg)
                D[g] = torch.zeros_like(Gg)
                D[g][torch.arange(len(p), device=Gg.device), p] = 1.0
            Ds.append(D)

        poly = _line_polynomial(spec, Ws, Ss, Ds)
        t = float(fminbound(lambda t: -float(np.polyval(poly, t)), 0.0, 1.0, xtol=1e-3, maxfun=20))
        Ss = [{g: S[g] + t * (D[g] - S[g]) for g in S} for S, D in zip(Ss, Ds)]
        obj = _objective(spec, Ws, Ss)
        result.objective.append(obj)
        result.steps.append(t)
        result.iterations = it + 1
        if obj - best < tol:
            stall += 1
        else:
            stall, best = 0, obj
        if stall >= patience:
            break
    result.perms = [{g: lap(S[g]).cpu() for g in S} for S in Ss]
    result.final_objective = _objective(spec, Ws, _hard(result.perms, device))
    if start is not None:  # a start at permutations is kept when the rounded end is worse
        start_obj = _objective(spec, Ws, _hard(start, device))
        if start_obj > result.final_objective:
            result.perms, result.final_objective = [{g: p.cpu() for g, p in P.items()} for P in start], start_obj
    return result


def _hard(perms: Sequence[Perms], device) -> list[Soft]:
    return [{g: torch.eye(len(p), dtype=torch.float64, device=device)[p.to(device)] for g, p in P.items()}
            for P in perms]


def merge_in_universe(spec: PermutationSpec, models: Sequence[Mapping[str, torch.Tensor]], perms: Sequence[Perms],
                      weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """sum_i w_i P_i(W_i) (weights normalized; equal by default) over every floating tensor;
    non-floating tensors (integer buffers) are taken from the first model."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(models), dtype=torch.float64)
    if len(w) != len(models):
        raise ValueError(f"params.weights: {len(w)} values for {len(models)} models")
    if float(w.sum()) <= 0:
        raise ValueError("params.weights must have a positive sum")
    w = w / w.sum()
    aligned = [permute_state(spec, m, p) for m, p in zip(models, perms)]
    out = {}
    for name, t in aligned[0].items():
        if not t.is_floating_point():
            out[name] = t
            continue
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for wi, a in zip(w.tolist(), aligned):
            acc += wi * a[name].to(torch.float64)
        out[name] = acc.to(t.dtype)
    return out
