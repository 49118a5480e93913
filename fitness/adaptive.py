"""Adaptive item selection (computerized adaptive testing, CAT) for scoring a candidate merge.

MERGE^3 (Mencattini et al. 2025) and Evo-L2S pick one fixed subset of items before the search
and score every candidate on it; how much each item tells about a given candidate's ability is
then luck: an easy item says little about a strong merge, a hard one little about a weak merge.
CAT (van der Linden & Glas, "Elements of Adaptive Testing", 2010) chooses each candidate's items
from its own answers so far:

1. start from a prior N(mu, diag(s^2)) on the candidate's ability theta (``Prior``):
   ``endpoint_prior``: mean and spread of the endpoint models' abilities (the candidate is a
   merge of them, MERGE^3's assumption), or ``PopulationPrior``: mean and spread of the
   candidates already scored in this job (empirical Bayes), falling back to the endpoint prior
   before the first one; both with a floor ``min_sd`` on the spread, so that the prior cannot
   dominate the answers (a tight prior from a few similar candidates would otherwise pull every
   later estimate onto them);
2. in rounds, pick the next batch of ``round_size`` unseen items with the highest Fisher
   information at the current estimate. For the 2PL item P_j(theta) = sigmoid(a_j . theta - b_j)
   the information matrix is I_j(theta) = P_j (1 - P_j) a_j a_j^T (I(theta) = a^2 p (1-p) in one
   dimension). With a multidimensional theta items are picked by D-optimality, greedily: the
   next item maximises det(H + I_j), i.e. (matrix determinant lemma) P_j (1-P_j) a_j^T H^-1 a_j,
   where H is the posterior precision (prior precision plus the information of the items seen
   and of those already picked for this round); in one dimension this is exactly "the round_size
   items of highest information at theta_hat". Ties go to the lower item index;
3. evaluate the whole batch in one batched forward pass (the caller does that: ``CatSession``
   hands out indices and takes answers back), and update theta by MAP (Newton's method on the
   log-posterior, which is concave for the 2PL with a Gaussian prior);
4. stop at the item budget, or when the posterior standard deviation of the predicted accuracy
   falls below ``stop_sd``, checked after each round (at least one round is always run).

Predicted accuracy, as tinyBenchmarks' p-IRT (Polo et al. 2024): the observed answers on the
items seen plus the predicted probability on the unseen ones,

    acc_hat = (1/N) [ sum_{j seen} y_j + sum_{j unseen} P_j(theta_hat) ],

so with a budget equal to the whole benchmark it is the exact accuracy. Its posterior sd is by
the delta method: g = (1/N) sum_{j unseen} P_j (1-P_j) a_j, sd = sqrt(g^T H^-1 g), H the posterior
precision at theta_hat (Laplace approximation). This is the uncertainty that comes from not
knowing theta; the Bernoulli noise of the unseen answers around P_j is left out (it does not
shrink as theta_hat sharpens and would make a fixed threshold unreachable on small benchmarks).

Adaptive selection keeps likelihood-based estimates valid: the choice of the next items depends
only on answers already observed, so the likelihood of the answers is the same product of item
terms as for a fixed subset (the design is ignorable). Plain or weighted subset means of the
chosen items are not unbiased estimates of the benchmark mean any more (the items are chosen to
be near 50% for this candidate), which is why p-IRT (with this MAP theta) is the estimator to
use with this strategy.

Defaults, and why: ``round_size`` 5 (the issue's measurements; at size 10 two rounds, the
first from the prior alone); in the simulation of tests/test_adaptive.py rounds of 1 / 5 / 10
items gave 3.2 / 3.5 / 3.4 points of error at 10 items and 2.0 / 2.0 / 2.0 at 50, so little is
lost by batching, while a round of 5 items per benchmark lets one forward pass carry every
benchmark's round (bench/fitness_estimators.py reports forward passes per candidate next to the
error); on a GPU with several benchmarks a larger round (10-20) costs almost nothing more;
``min_sd`` 0.5 in theta units (both IRT fitters put abilities on a roughly N(0, 1) scale, see
``fitness.irt``): in the simulation of tests/test_adaptive.py (merges' abilities spread 0.4)
floors of 0.2 / 0.3 / 0.5 gave the population prior 3.9 / 3.2 / 3.0 points of error at 10
items, so half a unit, wide enough that ten answers still move the estimate; ``stop_sd`` 0, i.e.
the early stop is off unless asked for: on the tiny zoo (bench/fitness_estimators.py) 0.02 saved
30% of the items at a budget of 10 per benchmark at no loss, but at 50 it stopped after 8 items
on average and left 4.1 points of error where the full budget reaches 2.8, because the Laplace
sd assumes the IRT model is right and IRT fitted on 17 rows is not; with item parameters fitted
on many models (tinyBenchmarks' leaderboard fits) the rule is worth turning on.

Why not catsim (installed; its ``catsim.irt.inf_hpc`` serves as an independent oracle for the
information function in tests/test_adaptive.py): its selectors (``MaxInfoSelector`` and others)
administer one item at a time, while the point here is batched rounds, one forward pass per round;
its item bank and estimators are one-dimensional in the a (theta - b) parameterisation, while our
item parameters (py-irt, MERGE^3) may be multidimensional with logit a . theta - b, which needs
D-optimal selection; and its estimators have no Gaussian prior with a mean other than zero, which
the endpoint and population priors need. The few lines of Newton's method below do all three.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from fitness.irt import LOGIT_CLIP, THETA_BOUND, ItemParams, bernoulli_nll, sigmoid

Array = np.ndarray

DEFAULT_ROUND = 5
DEFAULT_MIN_SD = 0.5
DEFAULT_STOP_SD = 0.0


# ---- priors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prior:
    """N(mean, diag(sd^2)) on theta; ``mean`` and ``sd`` are [dims]."""

    mean: Array
    sd: Array

    def __post_init__(self) -> None:
        mean = np.atleast_1d(np.asarray(self.mean, dtype=np.float64))
        sd = np.broadcast_to(np.asarray(self.sd, dtype=np.float64), mean.shape).copy()
        if np.any(~np.isfinite(mean)) or np.any(~(sd > 0)):
            raise ValueError("prior mean must be finite and sd positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "sd", sd)

    @property
    def precision(self) -> Array:
        return np.diag(1.0 / self.sd ** 2)


def spread_prior(thetas, min_sd: float = DEFAULT_MIN_SD) -> Prior:
    """Mean and per-dimension standard deviation of a set of abilities [n, dims], the sd floored
    at ``min_sd`` (with a single ability the sd is the floor)."""
    t = np.asarray(thetas, dtype=np.float64)
    t = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1)
    if t.shape[0] == 0:
        raise ValueError("no abilities to take a prior from")
    sd = t.std(axis=0, ddof=1) if t.shape[0] > 1 else np.zeros(t.shape[1])
    return Prior(t.mean(axis=0), np.maximum(sd, min_sd))


def endpoint_prior(endpoint_thetas, min_sd: float = DEFAULT_MIN_SD) -> Prior:
    """The prior ``prior: endpoints``: mean and spread of the endpoint models' abilities."""
    return spread_prior(endpoint_thetas, min_sd)


def map_abilities(item_params: ItemParams, rows) -> Array:
    """Known models' abilities from their answers [n, items], MAP under N(0, 1) (the fits'
    ability scale), not the MLE: a fine-tune that gets its own benchmark all right has its MLE at
    the +-8 bound, which would make a prior's mean and spread meaningless."""
    from fitness.irt import estimate_theta

    return estimate_theta(rows, item_params, method="map", prior_sd=1.0)


def answers_prior(item_params: ItemParams, rows, min_sd: float = DEFAULT_MIN_SD) -> Prior:
    """The endpoint prior of models known by their answers [n, items]."""
    return endpoint_prior(map_abilities(item_params, rows), min_sd)


class PopulationPrior:
    """The prior ``prior: population`` (empirical Bayes over one job's candidates).

    ``add(theta)`` after every scored candidate; ``prior()`` is the mean and spread of those
    added so far (sd floored at ``min_sd``), or ``fallback`` before the first. The history is a
    plain ordered list, so a resumed job rebuilds the same priors by adding the recorded
    candidates' abilities again in order (``restore``).
    """

    def __init__(self, fallback: Prior, min_sd: float = DEFAULT_MIN_SD):
        self.fallback, self.min_sd = fallback, float(min_sd)
        self.history: list[Array] = []

    def prior(self) -> Prior:
        return spread_prior(np.array(self.history), self.min_sd) if self.history else self.fallback

    def add(self, theta) -> None:
        self.history.append(np.atleast_1d(np.asarray(theta, dtype=np.float64)).copy())

    def restore(self, thetas: Sequence) -> None:
        self.history = []
        for t in thetas:
            self.add(t)


# ---- information, MAP, prediction ------------------------------------------------------------
def item_information(item_params: ItemParams, theta, items=None) -> Array:
    """Fisher information of each item at theta: [n] in one dimension (a^2 P (1-P)), else the
    matrices P (1-P) a a^T, [n, dims, dims]."""
    a = item_params.a if items is None else item_params.a[np.asarray(items, dtype=int)]
    p = item_params.prob(np.atleast_1d(np.asarray(theta, dtype=np.float64)), items)
    w = p * (1.0 - p)
    if item_params.dims == 1:
        return w * a[:, 0] ** 2
    return w[:, None, None] * a[:, :, None] * a[:, None, :]


def _nll_parts(item_params: ItemParams, items: Array, y: Array, theta: Array):
    a, b = item_params.a[items], item_params.b[items]
    z = a @ theta - b
    nll, resid = bernoulli_nll(z, y)
    p = sigmoid(np.clip(z, -LOGIT_CLIP, LOGIT_CLIP))
    grad = a.T @ resid
    hess = (a * np.where(np.abs(z) < LOGIT_CLIP, p * (1 - p), 0.0)[:, None]).T @ a
    return nll, grad, hess


def map_theta(item_params: ItemParams, items, y, prior: Prior, *, max_iter: int = 100,
              tol: float = 1e-10) -> tuple[Array, Array]:
    """MAP ability from answers ``y`` to ``items`` under ``prior``, and the posterior precision
    H = sum_j P_j (1-P_j) a_j a_j^T + prior precision at it (the Laplace approximation).

    Newton's method from the prior mean with step halving; the log-posterior is strictly concave,
    so it converges to the unique maximum (clipped to +-THETA_BOUND like ``estimate_theta``)."""
    items = np.asarray(items, dtype=int).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    P = prior.precision
    mu = prior.mean

    def objective(t: Array):
        nll, g, h = _nll_parts(item_params, items, y, t)
        d = t - mu
        return nll + 0.5 * float(d @ P @ d), g + P @ d, h + P

    theta = mu.copy()
    f, g, h = objective(theta)
    for _ in range(max_iter):
        step = np.linalg.solve(h, g)
        scale = 1.0
        while True:
            cand = np.clip(theta - scale * step, -THETA_BOUND, THETA_BOUND)
            f_new, g_new, h_new = objective(cand)
            if f_new <= f + 1e-12 or scale < 1e-8:
                break
            scale *= 0.5
        moved = float(np.abs(cand - theta).max())
        theta, f, g, h = cand, f_new, g_new, h_new
        if moved < tol:
            break
    return theta, h


def predicted_accuracy(item_params: ItemParams, items, y, theta) -> float:
    """p-IRT: (1/N) [sum over seen y_j + sum over unseen P_j(theta)]."""
    items = np.asarray(items, dtype=int).reshape(-1)
    N = item_params.n_items
    unseen = np.setdiff1d(np.arange(N), items)
    rest = float(item_params.prob(np.atleast_1d(theta), unseen).sum()) if unseen.size else 0.0
    return (float(np.sum(y)) + rest) / N


def accuracy_sd(item_params: ItemParams, items, theta, precision) -> float:
    """Posterior sd of the predicted accuracy by the delta method: sqrt(g^T H^-1 g),
    g = (1/N) sum over unseen P_j (1-P_j) a_j."""
    items = np.asarray(items, dtype=int).reshape(-1)
    N = item_params.n_items
    unseen = np.setdiff1d(np.arange(N), items)
    if unseen.size == 0:
        return 0.0
    p = item_params.prob(np.atleast_1d(theta), unseen)
    g = (p * (1 - p)) @ item_params.a[unseen] / N
    return float(np.sqrt(max(g @ np.linalg.solve(precision, g), 0.0)))


def select_batch(item_params: ItemParams, theta, precision, exclude, m: int) -> Array:
    """The next ``m`` items: greedy D-optimal at ``theta`` (max information in one dimension),
    never one in ``exclude``; ties to the lower index. Returns indices in the order picked."""
    N = item_params.n_items
    free = np.ones(N, dtype=bool)
    free[np.asarray(exclude, dtype=int)] = False
    m = min(int(m), int(free.sum()))
    if m <= 0:
        return np.zeros(0, dtype=int)
    p = item_params.prob(np.atleast_1d(np.asarray(theta, dtype=np.float64)))
    w = p * (1.0 - p)
    a = item_params.a
    if item_params.dims == 1:
        gain = np.where(free, w * a[:, 0] ** 2, -np.inf)
        order = np.lexsort((np.arange(N), -gain))  # by information descending, then index
        return order[:m].astype(int)
    Hinv = np.linalg.inv(precision)
    picked = []
    for _ in range(m):
        gain = w * np.einsum("jd,de,je->j", a, Hinv, a)  # det(H + I_j) / det(H) - 1
        gain = np.where(free, gain, -np.inf)
        j = int(np.argmax(gain))  # first maximum: the lower index on ties
        picked.append(j)
        free[j] = False
        u = Hinv @ a[j]  # Sherman-Morrison: (H + w a a^T)^-1
        Hinv = Hinv - w[j] * np.outer(u, u) / (1.0 + w[j] * a[j] @ u)
    return np.array(picked, dtype=int)


# ---- one candidate on one benchmark ----------------------------------------------------------
@dataclass
class CatSession:
    """CAT for one model on one benchmark, driven by the caller so that several benchmarks' rounds
    (and several sessions) can share one batched forward pass::

        s = CatSession(params, prior, budget=10)
        while not s.done:
            idx = s.next_items()
            s.observe(idx, answers_of_the_model(idx))   # one batched evaluation
        s.accuracy, s.theta, s.items, s.correct

    ``budget``: at most this many items (capped at the benchmark's size); ``round_size``: items per
    round; ``stop_sd``: stop early once the predicted accuracy's posterior sd is below it
    (0 disables).
    """

    item_params: ItemParams
    prior: Prior
    budget: int
    round_size: int = DEFAULT_ROUND
    stop_sd: float = DEFAULT_STOP_SD
    items: list[int] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.prior.mean.shape[0] != self.item_params.dims:
            raise ValueError(f"prior has {self.prior.mean.shape[0]} dims, items {self.item_params.dims}")
        if self.budget < 1 or self.round_size < 1:
            raise ValueError("budget and round_size must be at least 1")
        self.budget = min(int(self.budget), self.item_params.n_items)
        self.theta = self.prior.mean.copy()
        self.precision = self.prior.precision
        self.sd = accuracy_sd(self.item_params, [], self.theta, self.precision)
        self._stopped = False
        self._pending: Array | None = None

    @property
    def done(self) -> bool:
        return self._stopped or len(self.items) >= self.budget

    def next_items(self) -> Array:
        """The next round's items (empty when done)."""
        if self._pending is not None:
            raise RuntimeError("observe the previous round's answers first")
        if self.done:
            return np.zeros(0, dtype=int)
        m = min(self.round_size, self.budget - len(self.items))
        self._pending = select_batch(self.item_params, self.theta, self.precision, self.items, m)
        return self._pending.copy()

    def observe(self, items, correct) -> None:
        items = np.asarray(items, dtype=int).reshape(-1)
        if self._pending is None or not np.array_equal(items, self._pending):
            raise ValueError("observe the answers to exactly the items next_items returned")
        y = np.asarray(correct, dtype=np.float64).reshape(-1)
        if y.shape != items.shape or not np.all(np.isin(y, (0.0, 1.0))):
            raise ValueError("one 0/1 answer per item")
        self._pending = None
        self.items += items.tolist()
        self.correct += y.tolist()
        self.rounds += 1
        self.theta, self.precision = map_theta(self.item_params, self.items, self.correct, self.prior)
        self.sd = accuracy_sd(self.item_params, self.items, self.theta, self.precision)
        if self.stop_sd > 0 and self.sd < self.stop_sd:
            self._stopped = True

    @property
    def accuracy(self) -> float:
        return predicted_accuracy(self.item_params, self.items, self.correct, self.theta)

    def trace(self) -> dict:
        """What a job records per candidate and benchmark (JSON-ready): the items in the order
        given, the answers, the MAP ability, the accuracy's posterior sd, the rounds and the prior."""
        return {"items": [int(i) for i in self.items], "correct": [int(c) for c in self.correct],
                "theta": [float(t) for t in self.theta], "sd": float(self.sd), "rounds": int(self.rounds),
                "prior": {"mean": [float(v) for v in self.prior.mean], "sd": [float(v) for v in self.prior.sd]}}


@dataclass
class CatResult:
    items: Array
    correct: Array
    theta: Array
    accuracy: float
    sd: float
    rounds: int


def run_cat(item_params: ItemParams, answer: Callable[[Array], Array], prior: Prior, budget: int,
            round_size: int = DEFAULT_ROUND, stop_sd: float = DEFAULT_STOP_SD) -> CatResult:
    """A whole CAT for one model: ``answer(indices)`` returns its 0/1 answers to those items
    (e.g. one batched evaluation, or a slice of known full answers in simulations)."""
    s = CatSession(item_params, prior, budget, round_size, stop_sd)
    while not s.done:
        idx = s.next_items()
        s.observe(idx, answer(idx))
    return CatResult(np.array(s.items, dtype=int), np.array(s.correct), s.theta, s.accuracy, s.sd, s.rounds)


def fixed_map_accuracy(item_params: ItemParams, items, y, prior: Prior) -> float:
    """The same estimator on a fixed subset: MAP theta under ``prior``, then p-IRT. What a
    fixed subset scored like a CAT gives (the baseline adaptivity must beat)."""
    theta, _ = map_theta(item_params, items, y, prior)
    return predicted_accuracy(item_params, items, y, theta)


@dataclass(frozen=True)
class CatCheck:
    """Leave-one-out CATs on known rows (`loo_cats`): per row, the CAT's estimate, the row's
    observed accuracy and the CAT's Laplace sd."""

    estimates: Array
    truths: Array
    sds: Array

    @property
    def errors(self) -> Array:
        return self.estimates - self.truths

    @property
    def mae(self) -> float:
        return float(np.mean(np.abs(self.errors)))

    @property
    def model_sd(self) -> float:
        """What the Laplace sd leaves out: sqrt(max(mse - mean sd^2, 0))."""
        return float(np.sqrt(max(np.mean(self.errors ** 2) - np.mean(self.sds ** 2), 0.0)))

    def line(self) -> tuple[float, float]:
        """(intercept, slope) of `fit_line` on these rows: what a CAT's estimate is mapped by."""
        return fit_line(self.estimates, self.truths)

    def calibrated(self) -> "CatCheck":
        """The same rows with each estimate mapped by the line fitted on the other rows (nested
        leave-one-out) and its sd scaled by that line's slope: the calibrated CAT's honest errors."""
        est, sds = np.empty_like(self.estimates), np.empty_like(self.sds)
        for r in range(self.estimates.size):
            a, b = fit_line(np.delete(self.estimates, r), np.delete(self.truths, r))
            est[r], sds[r] = a + b * self.estimates[r], b * self.sds[r]
        return CatCheck(est, self.truths, sds)


def fit_line(estimates, truths) -> tuple[float, float]:
    """Least-squares line from a CAT's estimates to the truths, its slope clipped to [0, 1] (a
    shrinkage toward the rows' mean, never an expansion or a reversal): with item parameters
    fitted on few rows the CAT's errors are mostly a shared bias and an over-spread scale, which
    such a line removes without changing the order of the candidates (Spearman). Fewer than
    three rows, or estimates that do not vary: the identity."""
    x, t = np.asarray(estimates, dtype=np.float64), np.asarray(truths, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0:
        return 0.0, 1.0
    slope = float(np.clip(np.cov(x, t)[0, 1] / x.var(ddof=1), 0.0, 1.0))
    return float(t.mean() - slope * x.mean()), slope


def loo_cats(rows, n_endpoints: int, fit: Callable[[Array], ItemParams],
             prior_of: Callable[[ItemParams, Array], Prior], budget: int,
             round_size: int = DEFAULT_ROUND) -> CatCheck:
    """The CAT run where the truth is known: each probe row of the known ``rows`` [endpoints then
    probes, items] (full answers; probes are merges, as candidates are) answers a CAT of
    ``budget`` items against item parameters ``fit`` on the other rows (leave-one-out) and the
    prior ``prior_of(params, the other endpoints' answers)``. Without probes the endpoints stand
    in."""
    y = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    targets = list(range(n_endpoints, y.shape[0])) if y.shape[0] > n_endpoints else list(range(y.shape[0]))
    estimates, sds = [], []
    for r in targets:
        rest = np.delete(y, r, axis=0)
        params = fit(rest)
        prior = prior_of(params, rest[: n_endpoints - (r < n_endpoints)])
        result = run_cat(params, lambda idx, r=r: y[r, idx], prior, budget, round_size)
        estimates.append(result.accuracy)
        sds.append(result.sd)
    return CatCheck(np.array(estimates), y[targets].mean(axis=1), np.array(sds))


def calibrate_model_sd(rows, n_endpoints: int, fit: Callable[[Array], ItemParams],
                       prior_of: Callable[[ItemParams, Array], Prior], budget: int,
                       round_size: int = DEFAULT_ROUND) -> float:
    """What the Laplace sd of a CAT leaves out, measured by `loo_cats` on the known ``rows``: the
    model-error variance is the mean squared error of those estimates less their mean squared
    Laplace sd, at least 0. A CAT then reports sqrt(sd_laplace^2 + model_sd^2): with item
    parameters from few rows the Laplace sd alone covered 4-62 % of simulated truths with its
    90 % interval (bench/README.md). The sampling variance of a row's observed accuracy (the truth
    measured there; a candidate's truth is its expected accuracy) is not subtracted: with 13 probe
    rows the mean squared error is itself that noisy, and with the subtraction the interval held
    71-96 % of simulated truths (57 % in single worlds), without it 85-96 % (simulator, both
    families and presets, k = 10-50, 4 worlds each)."""
    return loo_cats(rows, n_endpoints, fit, prior_of, budget, round_size).model_sd
