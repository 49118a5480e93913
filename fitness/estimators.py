"""Estimate a model's accuracy on a whole benchmark from its answers on a small subset.

The benchmark has N items; the candidate answered only the n items of ``subset_idx`` (its 0/1
``responses``, aligned with ``subset_idx``). Every estimator has the same call::

    est(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, **options)

and returns a float for one response vector [n] or an array for a matrix [models, n]. ``estimate``
picks one by name from ``ESTIMATORS``.

    subset_mean  sum_i w_i y_i                                   (w from the subset: 1/n random,
                                                                   cluster shares for anchors)
    full         (1/N) sum_j y_j on all N items: the exact accuracy, the reference
    p_irt        (n/N) ybar_seen + (1 - n/N) mean_{j unseen} P_j(theta_hat)
                 Polo et al. 2024, "tinyBenchmarks", eq. for p-IRT; theta_hat = MLE on the subset
    gp_irt       lam * subset_mean + (1 - lam) * p_irt           tinyBenchmarks' generalised p-IRT
    mp_irt       (n/N) sum_i w_i y_i + (1 - n/N) mean_{j unseen} P_j(theta_m),
                 theta_m = sum_k lambda_k theta_k over the endpoint models' abilities, lambdas by
                 ML on the subset (Mencattini et al. 2025, "MERGE^3", merged-performance IRT)
    gmp_irt      delta * subset_mean + (1 - delta) * mp_irt, delta = 0.5   (MERGE^3)
    map_irt      p_irt with theta_hat = MAP under a normal prior on ability (the endpoints'
                 spread, `fitness.adaptive.endpoint_prior`): the CAT's estimator on a fixed subset
    blend_irt    w_m subset_mean + w_q map_irt + w_g (the known rows' mean accuracy), weights on
                 the simplex fitted by leave-one-out on the known rows (``calibrate_blend``)

with P_j(theta) = sigmoid(a_j . theta - b_j) (see ``fitness.irt``). The IRT part predicts the
unseen items from the ability the subset reveals; the blends hedge against IRT's model error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize

from fitness.irt import ItemParams, bernoulli_nll, estimate_theta

Array = np.ndarray
Estimate = float | Array


# ---- helpers ---------------------------------------------------------------------------------
def _rows(responses: Sequence | Array) -> tuple[Array, bool]:
    y = np.asarray(responses, dtype=np.float64)
    if y.ndim not in (1, 2):
        raise ValueError("responses must be [n] or [models, n]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("responses must be 0/1 answers (no NaN, no other values)")
    return np.atleast_2d(y), y.ndim == 1


def _indices(subset_idx, n: int) -> Array:
    """Subset item indices as integers, one per answer; floats that are not whole numbers refused."""
    raw = np.asarray(subset_idx).reshape(-1)
    if raw.size and not (np.issubdtype(raw.dtype, np.integer) or np.array_equal(raw, np.round(raw))):
        raise ValueError("subset_idx must be integer item indices")
    idx = raw.astype(int)
    if idx.shape[0] != n:
        raise ValueError(f"{n} responses for {idx.shape[0]} subset items")
    return idx


def _endpoint_thetas(endpoint_thetas, dims: int) -> Array:
    """Endpoint abilities as [K, dims] ([K] is accepted for one dimension)."""
    t = np.asarray(endpoint_thetas, dtype=np.float64)
    if t.ndim == 1 and dims == 1:
        t = t.reshape(-1, 1)
    if t.ndim != 2 or t.shape[1] != dims or t.shape[0] == 0 or not np.isfinite(t).all():
        raise ValueError(f"endpoint_thetas must be finite [K, {dims}] abilities, got shape {t.shape}")
    return t


def _share(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _out(values: Array, single: bool) -> Estimate:
    return float(values[0]) if single else values


def _weights(weights: Sequence | Array | None, n: int) -> Array:
    """Subset item weights normalised to sum 1 (uniform when none are given)."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != n or not np.isfinite(w).all() or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    return w / w.sum()


def _split(subset_idx: Sequence[int] | Array, item_params: ItemParams | None, n: int) -> tuple[Array, Array, int]:
    """Seen indices, unseen indices and N; checks the subset against the item parameters."""
    if item_params is None:
        raise ValueError("this estimator needs item_params (fitness.irt.ItemParams)")
    seen = _indices(subset_idx, n)
    N = item_params.n_items
    if np.any(seen < 0) or np.any(seen >= N) or np.unique(seen).size != seen.size:
        raise ValueError("subset_idx must be distinct item indices into the item parameters")
    unseen = np.setdiff1d(np.arange(N), seen)
    return seen, unseen, N


def _blend_irt(observed: Array, theta: Array, item_params: ItemParams, unseen: Array, n: int, N: int) -> Array:
    """(n/N) * observed + (1 - n/N) * mean over unseen items of P(correct | theta), per row."""
    if unseen.size == 0:
        return observed
    predicted = item_params.prob(theta, unseen).mean(axis=-1)
    return (n / N) * observed + (1.0 - n / N) * predicted


# ---- estimators ------------------------------------------------------------------------------
def subset_mean(responses, subset_idx=None, weights=None, item_params=None, endpoint_thetas=None) -> Estimate:
    """Weighted subset accuracy sum_i w_i y_i with sum_i w_i = 1 (plain mean without weights).

    With random subsets (w = 1/n) this is the sample mean; with tinyBenchmarks anchor subsets
    w_i is the share of the benchmark in anchor i's cluster (``tutorials/anchor_points.ipynb``).
    """
    y, single = _rows(responses)
    if subset_idx is not None:
        _indices(subset_idx, y.shape[1])
    return _out(y @ _weights(weights, y.shape[1]), single)


def full(responses, subset_idx=None, weights=None, item_params=None, endpoint_thetas=None) -> Estimate:
    """Exact accuracy (1/N) sum_j y_j: the model answered every item. The yardstick for the rest."""
    y, single = _rows(responses)
    return _out(y.mean(axis=1), single)


def p_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, *,
          theta_method: str = "mle", prior_sd: float = 1.0) -> Estimate:
    """p-IRT (tinyBenchmarks, Polo et al. 2024):

        Z_hat = (n/N) * ybar_seen + (1 - n/N) * (1/|unseen|) sum_{j unseen} P_j(theta_hat)

    The seen items count with their actual answers (their exact share of the full mean), the
    unseen ones with the IRT prediction at theta_hat, the MLE of the model's ability on the subset
    (``tinyBenchmarks/__init__.py::evaluate``: ``data_part_IRTp``, ``irt_part``, ``IRTp_lambd``).
    Following that code the seen part is the plain mean, so ``weights`` are not used here.
    """
    y, single = _rows(responses)
    seen, unseen, N = _split(subset_idx, item_params, y.shape[1])
    theta = estimate_theta(y, item_params, seen, method=theta_method, prior_sd=prior_sd)
    return _out(_blend_irt(y.mean(axis=1), theta, item_params, unseen, y.shape[1], N), single)


def gp_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, *,
           lam: float = 0.5, theta_method: str = "mle", prior_sd: float = 1.0) -> Estimate:
    """gp-IRT (tinyBenchmarks): Z_hat = lam * sum_i w_i y_i + (1 - lam) * p-IRT.

    tinyBenchmarks calibrates ``lam`` per benchmark on held-out models (``gp_irt_lambda``:
    lam = b^2 / (b^2 + v / (4n)), large when IRT is biased, small when the subset is noisy);
    without a calibrated value we take 0.5, the delta MERGE^3 uses for the same blend.
    """
    _share(lam, "lam")
    observed = subset_mean(responses, subset_idx, weights)
    pirt = p_irt(responses, subset_idx, weights, item_params, theta_method=theta_method, prior_sd=prior_sd)
    return lam * observed + (1.0 - lam) * pirt


def fit_lambdas(responses, subset_idx, item_params: ItemParams, endpoint_thetas) -> Array:
    """MERGE^3's ability of a merge as a combination of its endpoints' abilities.

    lambda_hat = argmax_lambda sum_{i in subset} y_i log P_i(theta_m) + (1-y_i) log(1-P_i(theta_m)),
    theta_m = sum_k lambda_k theta_k, by BFGS from equal weights 1/K, unconstrained, as Mergenetic's
    ``estimator/utils.py::fit_lambda``. Here the gradient is analytic: with g_ki = a_i . theta_k,
    dNLL/dlambda_k = sum_i g_ki (P_i - y_i). Returns [K] or [models, K].
    """
    y, single = _rows(responses)
    seen = np.asarray(subset_idx, dtype=int)
    thetas = _endpoint_thetas(endpoint_thetas, item_params.dims)
    K = thetas.shape[0]
    g = thetas @ item_params.a[seen].T          # [K, n]: each endpoint's a_i . theta_k
    b = item_params.b[seen]

    def nll(lam: Array, yy: Array) -> tuple[float, Array]:
        value, resid = bernoulli_nll(lam @ g - b, yy)
        return value, g @ resid

    start = np.full(K, 1.0 / K)
    lams = np.stack([minimize(nll, start, args=(row,), jac=True, method="BFGS").x for row in y])
    return lams[0] if single else lams


def mp_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None) -> Estimate:
    """mp-IRT (MERGE^3, Mencattini et al. 2025; Mergenetic ``eval_mpirt_on_anchors``):

        Z_hat = (n/N) * sum_i w_i y_i + (1 - n/N) * mean_{j unseen} P_j(theta_m),
        theta_m = sum_k lambda_k theta_k   (``fit_lambdas``)

    A merge of endpoint models is assumed to have an ability in the span of theirs, so only K
    lambdas (not a free theta) are read from the n answers. ``endpoint_thetas`` [K, dims] are the
    endpoints' MLE abilities on all their responses. With a single endpoint Mergenetic uses its
    theta as is; we do the same.
    """
    if endpoint_thetas is None:
        raise ValueError("mp_irt needs endpoint_thetas [K, dims]")
    y, single = _rows(responses)
    seen, unseen, N = _split(subset_idx, item_params, y.shape[1])
    thetas = _endpoint_thetas(endpoint_thetas, item_params.dims)
    if thetas.shape[0] == 1:
        theta_m = np.repeat(thetas, y.shape[0], axis=0)
    else:
        theta_m = np.atleast_2d(fit_lambdas(y, seen, item_params, thetas)) @ thetas
    observed = y @ _weights(weights, y.shape[1])
    return _out(_blend_irt(observed, theta_m, item_params, unseen, y.shape[1], N), single)


def gmp_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, *,
            delta: float = 0.5) -> Estimate:
    """gmp-IRT (MERGE^3; Mergenetic ``estimate_fitness``): delta * sum_i w_i y_i + (1 - delta) * mp-IRT,
    delta = 0.5 by default (Mergenetic's default)."""
    _share(delta, "delta")
    observed = subset_mean(responses, subset_idx, weights)
    return delta * observed + (1.0 - delta) * mp_irt(responses, subset_idx, weights, item_params, endpoint_thetas)


def map_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, *, prior=None) -> Estimate:
    """p-IRT with the ability read by MAP instead of maximum likelihood:

        theta_hat = argmax_theta  log L(theta; subset answers) + log N(theta; mu, diag(sd^2))

    ``prior`` (``fitness.adaptive.Prior``) is, in a job, the mean and spread of the endpoint
    models' abilities (sd floored at 0.5). With 10-20 answers the likelihood alone is flat or
    unbounded (all right or all wrong); the prior keeps theta among the abilities merges of
    these endpoints have. Our addition, not in tinyBenchmarks or MERGE^3: on the small zoo it
    is the most accurate estimator at k <= 20 items per benchmark (bench/fitness_estimators.py,
    column `map`). Like p-IRT, the seen part is the plain mean.
    """
    from fitness.adaptive import fixed_map_accuracy

    if prior is None:
        raise ValueError("map_irt needs a prior on ability (fitness.adaptive.Prior)")
    y, single = _rows(responses)
    seen, _, _ = _split(subset_idx, item_params, y.shape[1])
    return _out(np.array([fixed_map_accuracy(item_params, seen, row, prior) for row in y]), single)


@dataclass(frozen=True)
class Blend:
    """``blend_irt``'s weights on the subset mean, the IRT prediction and the known rows' mean
    accuracy (``known``, the value a candidate gets when nothing is learnt from its answers);
    they are non-negative and sum to 1."""

    mean: float
    irt: float
    prior: float
    known: float
    rmse: float = float("nan")  # the calibration's leave-one-out error at these weights: the estimate's sd
    # per probe row, the mean absolute error over the calibration's subsets with the weights also
    # fitted without the row (nested leave-one-out): what `estimator: auto` compares with the CAT's
    check_errors: tuple[float, ...] = ()

    @property
    def check_mae(self) -> float:
        return float(np.mean(self.check_errors)) if self.check_errors else float("nan")

    def to_json(self) -> dict:
        def finite(x: float) -> float | None:  # JSON has no NaN
            return x if np.isfinite(x) else None

        return {"mean": self.mean, "irt": self.irt, "prior": self.prior, "known": self.known,
                "rmse": finite(self.rmse), "check_mae": finite(self.check_mae)}


def blend_irt(responses, subset_idx, weights=None, item_params=None, endpoint_thetas=None, *, prior=None,
              blend: Blend | None = None) -> Estimate:
    """(n/N) ybar_seen + (1 - n/N) [w_mean subset_mean + w_irt mean_{j unseen} P_j(theta_map)
    + w_prior (the known rows' mean accuracy)], with the weights of ``calibrate_blend``: the seen
    answers count as what they are, the weights estimate the unseen items' mean (so with every
    item seen the estimate is exact, as for p-IRT).

    Why: with item parameters fitted on few rows (a job's endpoints and probes), IRT's prediction
    carries a bias no number of items removes (noisy discriminations, a 1-D model of answers
    with guessing and misfit), the subset mean is unbiased with variance ~ p (1 - p) / k, and
    merges of the same endpoints spread only a few points around the known rows' mean (guessing
    it errs 5-7 points on real answers: ../shared/real-answers.md). A stacked combination
    (Wolpert 1992; Breiman 1996) with weights that minimize the squared error where the truth is
    known, on rows each predicted from item parameters fitted without it, is at or below its
    best part in expectation at every k; tinyBenchmarks' gp-IRT (Polo et al. 2024) is the
    two-part case with a formula for the weight.
    """
    if blend is None:
        raise ValueError("blend_irt needs blend weights (fitness.estimators.calibrate_blend)")
    y, single = _rows(responses)
    seen, _, N = _split(subset_idx, item_params, y.shape[1])
    parts = _blend_parts(y, seen, weights, item_params, prior, blend.known)
    return _out(_blend_value(parts, np.array([blend.mean, blend.irt, blend.prior]), seen.size / N), single)


def _blend_parts(y: Array, seen: Array, weights, item_params: ItemParams, prior, known: float) -> Array:
    """[models, 4]: the plain mean of the seen answers, then the three estimates of the unseen
    items' mean that the weights mix: subset mean, IRT (mean P_j over the unseen items at the MAP
    ability), the known rows' mean."""
    N, n = item_params.n_items, seen.size
    plain = y.mean(axis=1)
    total = np.atleast_1d(map_irt(y, seen, None, item_params, prior=prior))
    unseen_irt = (total * N - plain * n) / (N - n) if n < N else plain
    return np.column_stack([plain, np.atleast_1d(subset_mean(y, seen, weights)), unseen_irt,
                            np.full(y.shape[0], known)])


def _blend_value(parts: Array, w: Array, share: float) -> Array:
    """The seen items count as answered (their share n/N of the benchmark); the weights estimate the rest."""
    return share * parts[:, 0] + (1.0 - share) * (parts[:, 1:] @ w)


# ---- calibration -----------------------------------------------------------------------------
def gp_irt_lambda(train_responses, item_params: ItemParams, n: int) -> float:
    """gp-IRT's blend weight, as tinyBenchmarks computes it (``tutorials/training_irt.ipynb``):

        lam = b^2 / (b^2 + v / (4 n))

    b: mean absolute error of IRT's prediction of a model's accuracy on the odd-numbered items
    from theta fitted on the even-numbered ones (the notebook's validation split);
    v: mean over models of the variance of their 0/1 answers across items; n: subset size.
    IRT bias b against the subset mean's sampling variance: the more biased IRT, the more weight
    on the plain subset estimate. Calibrate on models the item parameters were not fitted on,
    when there are any: in-sample rows understate b.
    """
    y = np.atleast_2d(np.asarray(train_responses, dtype=np.float64))
    even, odd = np.arange(0, y.shape[1], 2), np.arange(1, y.shape[1], 2)
    theta = estimate_theta(y[:, even], item_params, even)
    b = np.abs(item_params.prob(theta, odd).mean(axis=1) - y[:, odd].mean(axis=1)).mean()
    v = y.var(axis=1).mean()
    return float(b ** 2 / (b ** 2 + v / (4 * n))) if b > 0 else 0.0


def calibrate_blend(rows, n_endpoints: int, subset_idx, weights, fit: Callable[[Array], ItemParams],
                    prior_of: Callable[[ItemParams, Array], object], *, draws: int = 8, seed: int = 0,
                    step: float = 0.02) -> Blend:
    """``blend_irt``'s weights for subsets of this size, by leave-one-out over the known ``rows``
    [models, items] (full answers, so each row's accuracy t is known): each row is predicted from
    item parameters ``fit`` on the other rows and the prior ``prior_of(params, answers)`` from the
    other endpoints' answers (the first ``n_endpoints`` rows are the endpoints; a row
    the parameters were fitted on looks better predicted than a new model will be), on the job's
    subset and ``draws - 1`` random subsets of its size (one subset alone gives noisy weights),
    as its subset mean m, its map_irt q and the other rows' mean accuracy g. The weights are
    those on the simplex (a grid of ``step``) minimizing sum (w_m m + w_q q + w_g g - t)^2; the
    root mean square of those leave-one-out errors is the blend's ``rmse``, the sd to report
    with an estimate (it contains what the model gets wrong, which a Laplace sd leaves out).
    ``check_errors`` are the mean absolute errors of the probe rows (the rows after the endpoints:
    merges, as candidates are; all rows when there are none) with each row's weights fitted
    without it too, honest figures to compare with another estimator's leave-one-out errors."""
    y = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    n_rows, N = y.shape
    idx0 = np.asarray(subset_idx, dtype=int)
    rng = np.random.default_rng(seed)
    subsets = [(idx0, weights)] + [(np.sort(rng.choice(N, idx0.size, replace=False)), None) for _ in range(draws - 1)]
    parts, truth, shares, row_of = [], [], [], []
    for r in range(n_rows):
        rest = np.delete(y, r, axis=0)
        params = fit(rest)
        prior = prior_of(params, rest[: n_endpoints - (r < n_endpoints)])
        for idx, w in subsets:
            parts.append(_blend_parts(y[r : r + 1, idx], idx, w, params, prior, rest.mean())[0])
            truth.append(y[r].mean())
            shares.append(idx.size / N)
            row_of.append(r)
    X, t, share, row_of = np.array(parts), np.array(truth), np.array(shares), np.array(row_of)
    ticks = np.round(np.arange(0.0, 1.0 + step / 2, step), 10)
    grid = np.array([(a, b, 1.0 - a - b) for a in ticks for b in ticks if a + b <= 1.0 + 1e-9])
    pred = share[:, None] * X[:, :1] + (1.0 - share[:, None]) * (X[:, 1:] @ grid.T)
    sq = (pred - t[:, None]) ** 2
    sse = sq.sum(axis=0)
    best = int(np.argmin(sse))
    m, q, g = (float(max(v, 0.0)) for v in grid[best])
    checked = range(n_endpoints, n_rows) if n_rows > n_endpoints else range(n_rows)
    nested = [np.sqrt(sq[row_of == r, int(np.argmin(sse - sq[row_of == r].sum(axis=0)))]).mean() for r in checked]
    return Blend(m, q, g, float(y.mean()), float(np.sqrt(sse[best] / t.size)), tuple(float(e) for e in nested))


def judge(estimated, exact) -> dict[str, float]:
    """How well estimates track the exact accuracies over a set of held-out models: mean absolute
    error, and Spearman rank correlation (what an evolutionary search needs is the ordering)."""
    from scipy.stats import spearmanr

    est, ref = np.asarray(estimated, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    rho = spearmanr(est, ref)[0] if est.size > 1 and np.ptp(est) > 0 and np.ptp(ref) > 0 else float("nan")
    return {"mae": float(np.abs(est - ref).mean()), "spearman": float(rho)}


# ---- registry --------------------------------------------------------------------------------
ESTIMATORS: dict[str, Callable[..., Estimate]] = {
    "subset_mean": subset_mean,
    "full": full,
    "p_irt": p_irt,
    "gp_irt": gp_irt,
    "mp_irt": mp_irt,
    "gmp_irt": gmp_irt,
    "map_irt": map_irt,
    "blend_irt": blend_irt,
}
NEEDS_ITEM_PARAMS = frozenset({"p_irt", "gp_irt", "mp_irt", "gmp_irt", "map_irt", "blend_irt"})
NEEDS_PRIOR = frozenset({"map_irt", "blend_irt"})
NEEDS_ENDPOINTS = frozenset({"mp_irt", "gmp_irt"})


def estimate(name: str, responses, subset_idx=None, weights=None, item_params: ItemParams | None = None,
             endpoint_thetas=None, **options) -> Estimate:
    """Accuracy estimate by estimator name (see ``ESTIMATORS``); ``options`` go to that estimator
    (``lam`` for gp_irt, ``blend`` for blend_irt, ``delta`` for gmp_irt, ``theta_method``/``prior_sd`` for p/gp_irt, ``prior`` for map_irt)."""
    try:
        fn = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}") from None
    return fn(responses, subset_idx, weights, item_params, endpoint_thetas, **options)
