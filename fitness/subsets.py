"""Choose the few benchmark items a candidate merge is run on, and how much each one counts.

Four strategies, each deterministic for a seed and returning a ``Subset`` (item indices, their
weights summing to 1, the strategy name):

* ``random_subset``: uniform sample, weights 1/n (MERGE^3's random subsets).
* ``balanced_subset``: the random draw, among a few hundred, on which the known models (endpoints
  and probes) score closest to their full accuracies (rejective balanced sampling).
* ``anchor_subset``: tinyBenchmarks' anchor points (Polo et al. 2024, ``tutorials/
  anchor_points.ipynb``): KMeans on item embeddings, either the IRT parameters (a_j, b_j) or the
  items' response pattern over known models; one representative item per cluster, weighted by the
  cluster's share of the items, so sum_i w_i y_i estimates the mean over all items.
* ``entropy_subset``: Evo-L2S: run a few probe merges on every item and keep the items they
  disagree on most, scored by the binary entropy H(p) = -p log p - (1-p) log(1-p) of the share
  p of probes answering correctly; items every probe gets right (or wrong) say nothing about
  which candidate is better.

``groups`` (one label per item) marks strata: benchmarks concatenated into one item pool, or
(as ``fitness.Fitness`` uses it) item kinds within a benchmark. Every strategy then splits n
across groups in proportion to their size (at least one item each when n allows) and chooses
within each group, so no stratum goes unrepresented. Weights are then (group size / N) / (items
taken from the group), so the weighted mean still estimates the mean over all N items. Why kinds:
on the small zoo a merge answers ~50% of the multiple-choice items and ~3% of the generation
items, so how many of a plain random 20-item draw happen to be multiple choice moves its mean by
points; stratified, the same draws err 16% less (subset mean, `bench/fitness_estimators.py`).

``difficulty_strata`` refines those labels for ``random`` subsets (as ``fitness.Fitness`` draws
them): within each kind, items are ranked by how many known models (endpoints and probes) answer
them, and cut into as many equal strata as the kind gets items, so the draw takes one item from
each difficulty band (stratified sampling with proportional allocation, Cochran 1977, "Sampling
Techniques", ch. 5). The weighted mean stays unbiased, and it no longer depends on how many of
the rare items that merges solve a draw happens to catch: on the small zoo the subset mean's
error at 20 items fell from 4.9 to 3.8 points, and gmp-IRT's from 4.1 to 3.6 (measured with
the earlier task-arithmetic probes; the README has the current numbers).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fitness.irt import ItemParams

Array = np.ndarray
DEFAULT_DRAWS = 300  # balanced_subset: random draws to choose from


@dataclass(frozen=True)
class Subset:
    """Item ``indices`` (sorted, into the full item pool), ``weights`` (sum 1), ``strategy``."""

    indices: Array
    weights: Array
    strategy: str

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices, dtype=int)
        w = np.asarray(self.weights, dtype=np.float64)
        if idx.shape != w.shape or idx.ndim != 1:
            raise ValueError("indices and weights must be 1-D and of equal length")
        if np.unique(idx).size != idx.size:
            raise ValueError("indices must be distinct")
        order = np.argsort(idx, kind="stable")
        object.__setattr__(self, "indices", idx[order])
        object.__setattr__(self, "weights", w[order])

    def __len__(self) -> int:
        return int(self.indices.size)

    def to_dict(self) -> dict[str, Any]:
        return {"indices": self.indices.tolist(), "weights": self.weights.tolist(), "strategy": self.strategy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Subset":
        return cls(np.asarray(data["indices"]), np.asarray(data["weights"]), str(data["strategy"]))


# ---- stratification --------------------------------------------------------------------------
def _groups(groups: Sequence | Array | None, n_items: int) -> Array:
    if groups is None:
        return np.zeros(n_items, dtype=int)
    g = np.asarray(groups)
    if g.shape != (n_items,):
        raise ValueError(f"groups must give one label per item ({n_items})")
    return np.unique(g, return_inverse=True)[1]


def allocate(k: int, sizes: Sequence[int]) -> Array:
    """Split k picks over groups of the given sizes: one per group first when k allows, then
    one at a time to the group furthest below its proportional share k * size / total (so the
    result is the proportional split, rounded), never more than a group holds."""
    sizes = np.asarray(sizes, dtype=int)
    if not 0 < k <= sizes.sum():
        raise ValueError(f"k must be in 1..{sizes.sum()}, got {k}")
    take = np.minimum(sizes, 1) if k >= sizes.size else np.zeros(sizes.size, dtype=int)
    quota = k * sizes / sizes.sum()
    for _ in range(k - int(take.sum())):
        take[np.argmax(np.where(take < sizes, quota - take, -np.inf))] += 1
    return take


def _stratified(k: int, labels: Array, pick: Callable[[Array, int, np.random.Generator], Any],
                rng: np.random.Generator) -> tuple[Array, Array]:
    """Run ``pick(items_of_group, k_group, rng)`` per group. A pick returns the chosen items (each
    then weighs (N_g / N) / k_g) or (items, shares): each item's share of its group, summing to 1
    (anchors stand for clusters of different sizes); an item weighs (N_g / N) * share."""
    sizes = np.bincount(labels)
    chosen, weights = [], []
    for g, k_g in enumerate(allocate(k, sizes)):
        if k_g == 0:
            continue
        picked = pick(np.flatnonzero(labels == g), int(k_g), rng)
        idx, share = picked if isinstance(picked, tuple) else (picked, None)
        idx = np.asarray(idx, dtype=int)
        share = np.full(idx.size, 1.0 / idx.size) if share is None else np.asarray(share, dtype=np.float64)
        chosen.append(idx)
        weights.append(sizes[g] / labels.size * share)
    return np.concatenate(chosen), np.concatenate(weights)


def _seed(seed) -> int:
    """A subset is deterministic for its seed, so there must be one: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def success_rate(responses) -> Array:
    """Share of known models ([models, items], NaN = not run) answering each item right; 0 for an
    item no model ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        return np.nan_to_num(np.nanmean(np.atleast_2d(np.asarray(responses, dtype=np.float64)), axis=0), nan=0.0)


def difficulty_strata(groups, responses, k: int) -> Array:
    """Labels that split each group into as many strata as ``allocate`` gives it of k items,
    by the rank of each item's success rate among known models (``responses`` [models, items],
    NaN = not run; ties in item order). With one item drawn per stratum, a stratum holds items of
    about equal difficulty."""
    y = np.atleast_2d(np.asarray(responses, dtype=np.float64))
    labels = _groups(groups, y.shape[1])
    p = success_rate(y)
    out = np.zeros(y.shape[1], dtype=int)
    for g, k_g in enumerate(allocate(min(k, y.shape[1]), np.bincount(labels))):
        members = np.flatnonzero(labels == g)
        rank = np.empty(members.size, dtype=int)
        rank[np.argsort(p[members], kind="stable")] = np.arange(members.size)
        out[members] = g * y.shape[1] + (rank * max(int(k_g), 1)) // members.size
    return _groups(out, y.shape[1])


# ---- strategies ------------------------------------------------------------------------------
def random_subset(n_items: int, k: int, seed: int = 0, groups=None) -> Subset:
    """k items drawn uniformly without replacement (per group when ``groups``); weights 1/k."""
    if not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
    if not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    labels = _groups(groups, n_items)
    rng = np.random.default_rng(_seed(seed))
    idx, w = _stratified(k, labels, lambda members, k_g, r: r.choice(members, k_g, replace=False), rng)
    return Subset(idx, w, "random")


def balanced_subset(known_responses, k: int, seed: int = 0, groups=None, draws: int = DEFAULT_DRAWS) -> Subset:
    """Rejective balanced sampling: of ``draws`` seeded ``random_subset`` draws (same strata), the
    one whose weighted mean best reproduces the known models' accuracies.

        S* = argmin_{S_1..S_M} sum_m (sum_{i in S} w_i y_mi - (1/N) sum_j y_mj)^2

    over the known models m (``known_responses`` [models, items]: endpoints and probes, no NaN).
    The known models' answers act as auxiliary variables that a subset should balance (Deville &
    Tille 2004, "Efficient balanced sampling: the cube method", Biometrika 91; Fuller 2009,
    "Some design properties of a rejective sampling procedure", Biometrika 96: redraw until
    balanced). Candidates of a search are merges like the probes, so a subset on which the probes
    score what they score in full is one on which the candidates do too. The weights stay the
    strata's, so the estimators treat it as a random subset. Draw seeds come from ``seed``; ties go
    to the earlier draw. On the small zoo, 20 items, 20 seeds (``bench/fitness_estimators.py``):
    subset mean 3.33 -> 2.90 points, gmp-IRT 3.03 -> 2.86, MAP 2.65 -> 2.49 (300 draws; offline,
    100 and 1000 draws within 0.04).
    """
    y = np.atleast_2d(np.asarray(known_responses, dtype=np.float64))
    if y.size == 0 or not np.isfinite(y).all():
        raise ValueError("balanced subsets need the known models' answers on every item (no NaN)")
    if not isinstance(draws, (int, np.integer)) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    seeds = np.random.default_rng(_seed(seed)).integers(0, 2**63 - 1, size=int(draws))
    target = y.mean(axis=1)
    best, best_err = None, np.inf
    for s in seeds:
        sub = random_subset(y.shape[1], k, seed=int(s), groups=groups)
        err = float(((y[:, sub.indices] @ sub.weights - target) ** 2).sum())
        if err < best_err:
            best, best_err = sub, err
    return Subset(best.indices, best.weights, "balanced")


def binary_entropy(p: Array) -> Array:
    """H(p) in nats; 0 at p = 0 and p = 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    return np.nan_to_num(h, nan=0.0)


def entropy_subset(probe_responses, k: int, seed: int = 0, groups=None) -> Subset:
    """Evo-L2S: the k items with the highest binary entropy of the probes' success rate.

    probe_responses: [probes, items] 0/1 (NaN = not run), e.g. task-arithmetic merges at
    lambda = 0, 0.1, ..., 1 between the endpoints. p_j = share of probes right on item j,
    score H(p_j). Ties, and the fill when fewer than k items have 0 < p < 1, are broken at random
    (seeded), so uninformative items enter only as a uniform random fill. Weights 1/k (group
    shares with ``groups``).
    """
    y = np.atleast_2d(np.asarray(probe_responses, dtype=np.float64))
    score = binary_entropy(success_rate(y))
    labels = _groups(groups, y.shape[1])
    rng = np.random.default_rng(_seed(seed))

    def pick(members: Array, k_g: int, r: np.random.Generator) -> Array:
        tiebreak = r.random(members.size)
        order = np.lexsort((tiebreak, -score[members]))  # by score descending, then at random
        return members[order[:k_g]]

    idx, w = _stratified(k, labels, pick, rng)
    return Subset(idx, w, "entropy")


def item_embedding(item_params: ItemParams | None = None, responses=None, features: str = "irt") -> Array:
    """What anchor clustering sees of each item (tinyBenchmarks ``clustering='irt'|'correct.'``):
    ``"irt"``: [a_j1..a_jD, b_j]; ``"correctness"``: the item's 0/1 column over known models."""
    if features == "irt":
        if item_params is None:
            raise ValueError("features='irt' needs item_params")
        return np.column_stack([item_params.a, item_params.b])
    if features in ("correctness", "correct."):
        if responses is None:
            raise ValueError("features='correctness' needs responses [models, items]")
        return np.nan_to_num(np.asarray(responses, dtype=np.float64), nan=0.5).T
    raise ValueError("features must be 'irt' or 'correctness'")


def anchor_subset(k: int, item_params: ItemParams | None = None, responses=None, seed: int = 42,
                  groups=None, features: str = "irt") -> Subset:
    """tinyBenchmarks anchor points: KMeans (``n_init="auto"``, ``random_state=seed``, default 42
    as in the notebook) with k clusters on the item embeddings; the anchor of a cluster is its
    member closest to the centroid, its weight the cluster's size / N.

    tinyBenchmarks takes the item nearest each centroid over all items, which can pick the same
    item twice; choosing among the cluster's own members keeps anchors distinct and each weight
    tied to the items it stands for. Items often share one embedding (all known models wrong on
    them: the same answer column, and from a deterministic fit the same IRT parameters), so
    KMeans runs on the distinct embeddings weighted by how many items share each, with at most
    as many clusters as there are distinct points; when that is fewer than k, the k picks are
    split over the clusters in proportion to their sizes (``allocate``) and a cluster's picks are
    its items nearest the centroid (seeded random order among equals), each weighted by the
    cluster's share / its picks. So the subset always has k items.
    """
    from sklearn.cluster import KMeans

    X = item_embedding(item_params, responses, features)

    def anchors_of(members: Array, k_g: int, r: np.random.Generator) -> tuple[Array, Array]:
        points, which, counts = np.unique(X[members], axis=0, return_inverse=True, return_counts=True)
        n_clusters = min(k_g, points.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning on degenerate data
            km = KMeans(n_clusters=n_clusters, n_init="auto", random_state=seed).fit(points, sample_weight=counts)
        cluster = km.labels_[which.reshape(-1)]
        sizes = np.bincount(cluster, minlength=n_clusters)
        keep = np.flatnonzero(sizes)
        anchors, shares = [], []
        for c, take in zip(keep, allocate(k_g, sizes[keep])):
            in_c = np.flatnonzero(cluster == c)
            d = ((X[members[in_c]] - km.cluster_centers_[c]) ** 2).sum(axis=1)
            order = np.lexsort((r.random(in_c.size), d))[:take]
            anchors.append(members[in_c[order]])
            shares.append(np.full(order.size, sizes[c] / members.size / order.size))
        return np.concatenate(anchors), np.concatenate(shares)

    idx, w = _stratified(k, _groups(groups, X.shape[0]), anchors_of, np.random.default_rng(_seed(seed)))
    return Subset(idx, w, "anchor")
