"""Pareto fronts: non-dominated sorting, hypervolume and the knee point.

All functions take objective matrices F [n, m] in minimization form (a maximized
objective enters negated), as pymoo does.
"""
from __future__ import annotations

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Indices of the first front (pymoo's non-dominated sorting); duplicates all kept."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return np.array([], dtype=int)
    return np.sort(NonDominatedSorting().do(F, only_non_dominated_front=True))


def hypervolume(F: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by F and bounded by the reference point (points beyond it add nothing)."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=np.asarray(ref, dtype=float))(F))


def knee_point(F: np.ndarray) -> int:
    """Index (into F) of the front's knee, after scaling each objective to [0, 1]: the member
    farthest below the line/plane through the extremes (the "maximum distance to the hyperplane"
    knee, Das 1999). A concave front (merges often trade one task for another worse than
    linearly) has no member below that plane, and the rule would return an extreme, one task's
    specialist; there the knee is the member nearest the ideal point (every objective at its best
    on the front; compromise programming, Zeleny 1973). For one objective, the best point."""
    F = np.asarray(F, dtype=float)
    if F.shape[1] == 1 or len(F) <= 2:
        return int(np.argmin(F.sum(1)))
    lo, hi = F.min(0), F.max(0)
    Z = (F - lo) / np.where(hi > lo, hi - lo, 1.0)
    below = 1.0 - Z.sum(1)  # times sqrt(m): distance below the hyperplane sum(z) = 1
    if below.max() > 1e-12:
        return int(np.argmax(below))
    return int(np.argmin(np.linalg.norm(Z, axis=1)))


def checked_members(F: np.ndarray, knee: int, k: int | None) -> list[int]:
    """Which members of a front (indices into F) the final check evaluates in full: all when
    `k` is None, else at most k: the knee, the best member on each objective, then members
    spread evenly over the front (farthest-point order in objectives scaled to [0, 1], so
    each addition fills the widest gap left)."""
    F = np.asarray(F, dtype=float)
    n = len(F)
    if k is None or k >= n:
        return list(range(n))
    chosen = [knee]
    for j in range(F.shape[1]):
        best = int(np.argmin(F[:, j]))
        if best not in chosen:
            chosen.append(best)
    chosen = chosen[:k]
    lo, hi = F.min(0), F.max(0)
    Z = (F - lo) / np.where(hi > lo, hi - lo, 1.0)
    while len(chosen) < k:
        gap = np.min(np.linalg.norm(Z[:, None, :] - Z[chosen][None, :, :], axis=2), axis=1)
        gap[chosen] = -1.0
        chosen.append(int(np.argmax(gap)))
    return sorted(chosen)
