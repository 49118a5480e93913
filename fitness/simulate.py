"""Simulated benchmark answers that look like real LLM answers, for testing and benchmarking fitness estimates.

The zoo's answers are nearly fixed by model and item, so IRT fitted on a few rows describes them well and
flatters every estimator (issue 22). Real leaderboard answers (../shared/real-answers.md) are noisier:
a guessing floor from multiple choice, items that carry no signal or the wrong one, at least two ability
dimensions, and models that spread only ~7 accuracy points. This module draws 0/1 answer matrices from a
response model with all of that, seeded, in plain numpy.

Response model (Birnbaum's 3PL, 1968, with a slip ceiling -- the "4PL" of Barton & Lord 1981 -- on
Reckase's compensatory multidimensional logit, "Multidimensional Item Response Theory", 2009)::

    P(item j correct | theta) = c_j + (1 - c_j - s_j) * sigmoid(a_j . theta - b_j)

* ``theta`` [dims]: a model's abilities. Dimension 0 is the benchmark's skill; the others are nuisance
  traits (answer format, position bias, a sub-domain), correlated with the skill by ``ability_corr``.
* ``a_j`` [dims]: dimension 0 is lognormal (positive) for items that fit; the nuisance loadings are signed
  normals, so an item can reward or punish a trait that has nothing to do with the skill.
* ``c_j``: the guessing floor, 1/choices on average. Distractors are not equally attractive (and a model
  that answers nothing parsable gets no floor), so floors vary by item: Beta with mean 1/choices and
  concentration ``guess_concentration`` (None: exactly 1/choices on every item).
* ``s_j``: the slip, a ceiling below 1 (mislabelled items, answers the grader misreads), uniform on
  [0, slip_max].
* misfit items (share ``misfit_share``): their skill loading is drawn from N(misfit_mean, misfit_sd),
  around zero or below it: no signal, or the wrong one.

A population (``Simulation.abilities``) is a set of independent draws, like the models of a leaderboard;
a merge family (``merge_family``) has abilities made from its parents', theta = sum_k w_k theta_k + noise
with weights on the simplex, which is the assumption of MERGE^3's mp-IRT (Mencattini et al. 2025).

A model's true accuracy is its *expected* accuracy over the benchmark's items, (1/N) sum_j P_j(theta):
what an estimator should recover, without the binomial noise of one set of answers.

``describe`` computes the statistics of the real-answers table from a response matrix, and the two
presets ``MMLU_PRO_MATH`` and ``ARC_CHALLENGE`` are calibrated so that their simulated matrices reproduce
that table (``describe_preset``; side by side in bench/README.md, "Fitness on simulated real answers").
tinyBenchmarks (Polo et al. 2024) fits a 1-D or few-D 2PL on ~400 leaderboard models; this simulator's
answers are from a model that 2PL cannot fit exactly, as the real ones are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.sparse.linalg import eigsh

from fitness.irt import sigmoid

Array = np.ndarray


@dataclass(frozen=True)
class SimConfig:
    """The simulator's knobs (module docstring). Abilities: N(ability_mean, diag(ability_sd^2)) with
    correlation ``ability_corr`` between the skill (dim 0) and every nuisance trait."""

    n_items: int = 1000
    choices: int | None = 4  # multiple-choice options; None: no guessing floor (free generation)
    dims: int = 2
    ability_mean: float = 0.0  # skill's mean (nuisance traits have mean 0)
    ability_sd: tuple[float, ...] = (1.0, 1.0)  # per dimension
    ability_corr: float = 0.0
    a_log_mean: float = 0.0  # skill discrimination of fitting items: lognormal(a_log_mean, a_log_sd)
    a_log_sd: float = 0.5
    nuisance_sd: tuple[float, ...] = (0.5,)  # signed loadings on dims 1.. (one sd per nuisance dim)
    b_mean: float = 0.0
    b_sd: float = 1.5
    guess_concentration: float | None = None  # Beta concentration of floors around 1/choices
    slip_max: float = 0.0
    misfit_share: float = 0.0
    misfit_mean: float = 0.0
    misfit_sd: float = 0.3

    def __post_init__(self) -> None:
        if self.dims < 1 or len(self.ability_sd) != self.dims or len(self.nuisance_sd) != self.dims - 1:
            raise ValueError("ability_sd needs one sd per dim and nuisance_sd one per dim after the first")
        if self.choices is not None and self.choices < 2:
            raise ValueError("choices must be at least 2 (or None)")
        if not (0 <= self.misfit_share <= 1 and 0 <= self.slip_max < 1):
            raise ValueError("misfit_share must lie in [0, 1] and slip_max in [0, 1)")


@dataclass
class Simulation:
    """True item parameters of one simulated benchmark: loadings ``a`` [items, dims], difficulties ``b``,
    floors ``c``, slips ``s``, and which items are ``misfit``."""

    config: SimConfig
    a: Array
    b: Array
    c: Array
    s: Array
    misfit: Array

    @classmethod
    def draw(cls, config: SimConfig, rng: np.random.Generator) -> "Simulation":
        n, d = config.n_items, config.dims
        a = np.empty((n, d))
        a[:, 0] = rng.lognormal(config.a_log_mean, config.a_log_sd, n)
        for k, sd in enumerate(config.nuisance_sd, start=1):
            a[:, k] = rng.normal(0.0, sd, n)
        misfit = rng.random(n) < config.misfit_share
        a[misfit, 0] = rng.normal(config.misfit_mean, config.misfit_sd, int(misfit.sum()))
        b = rng.normal(config.b_mean, config.b_sd, n)
        if config.choices is None:
            c = np.zeros(n)
        elif config.guess_concentration is None:
            c = np.full(n, 1.0 / config.choices)
        else:
            m, k = 1.0 / config.choices, config.guess_concentration
            c = rng.beta(m * k, (1 - m) * k, n)
        s = rng.uniform(0.0, config.slip_max, n) if config.slip_max > 0 else np.zeros(n)
        s = np.minimum(s, 1.0 - c - 1e-3)  # keep the ceiling above the floor
        return cls(config, a, b, c, s, misfit)

    @property
    def n_items(self) -> int:
        return int(self.b.shape[0])

    def prob(self, theta) -> Array:
        """P(correct) [models, items] (or [items] for one theta [dims])."""
        t = np.asarray(theta, dtype=np.float64)
        return self.c + (1.0 - self.c - self.s) * sigmoid(t @ self.a.T - self.b)

    def accuracy(self, theta) -> Array:
        """Expected accuracy over the benchmark's items: the truth an estimator should recover."""
        return self.prob(theta).mean(axis=-1)

    def answer(self, theta, rng: np.random.Generator) -> Array:
        """One set of 0/1 answers (float) per model, drawn independently per item."""
        p = self.prob(theta)
        return (rng.random(p.shape) < p).astype(np.float64)

    def abilities(self, n: int, rng: np.random.Generator) -> Array:
        """n independent models, [n, dims]: a leaderboard-like population."""
        cfg = self.config
        sd = np.asarray(cfg.ability_sd, dtype=np.float64)
        corr = np.full((cfg.dims, cfg.dims), 0.0)
        corr[0, 1:] = corr[1:, 0] = cfg.ability_corr
        np.fill_diagonal(corr, 1.0)
        mean = np.zeros(cfg.dims)
        mean[0] = cfg.ability_mean
        return rng.multivariate_normal(mean, corr * np.outer(sd, sd), size=n, method="cholesky")


def merge_family(parents_theta, n: int, rng: np.random.Generator, *, noise_sd: float = 0.1,
                 concentration: float = 1.0, shift: float = 0.0) -> tuple[Array, Array]:
    """Abilities of n merges of K parents: theta = sum_k w_k theta_k + shift * e_0 + N(0, noise_sd^2 I),
    w ~ Dirichlet(concentration), on the simplex. ``shift`` moves the skill (negative: merging costs some
    of it, the interference TIES and TSV try to remove). Returns (theta [n, dims], weights [n, K])."""
    parents = np.atleast_2d(np.asarray(parents_theta, dtype=np.float64))
    w = rng.dirichlet(np.full(parents.shape[0], concentration), size=n)
    theta = w @ parents + rng.normal(0.0, noise_sd, (n, parents.shape[1])) if noise_sd > 0 else w @ parents
    theta[:, 0] += shift
    return theta, w


class Sample(NamedTuple):
    responses: Array  # [models, items] 0/1
    accuracy: Array  # [models] expected accuracy
    theta: Array  # [models, dims]
    sim: Simulation


def simulate(config: SimConfig, n_models: int, seed: int | np.random.Generator = 0) -> Sample:
    """Draw a benchmark (item parameters) and n_models independent models' answers to it."""
    rng = np.random.default_rng(seed)
    sim = Simulation.draw(config, rng)
    theta = sim.abilities(n_models, rng)
    return Sample(sim.answer(theta, rng), sim.accuracy(theta), theta, sim)


class JobWorld(NamedTuple):
    """What an evolve job sees of one simulated benchmark: the known rows (the K parents, its
    endpoints, then the probe merges: full answers), and the candidates (merges of the same
    parents): their true expected accuracy and one draw of their answers."""

    sim: Simulation
    known: Array  # [parents + probes, items] 0/1
    truth: Array  # [candidates] expected accuracy
    answers: Array  # [candidates, items] 0/1


def job_world(config: SimConfig, rng: np.random.Generator, *, parents: int = 4, probes: int = 13,
              candidates: int = 40, noise_sd: float = 0.3) -> JobWorld:
    """One benchmark, a job's known rows and its candidates, as tests and bench/ score them."""
    sim = Simulation.draw(config, rng)
    ends = sim.abilities(parents, rng)
    probe_theta, _ = merge_family(ends, probes, rng, noise_sd=noise_sd)
    known = sim.answer(np.vstack([ends, probe_theta]), rng)
    cand, _ = merge_family(ends, candidates, rng, noise_sd=noise_sd)
    return JobWorld(sim, known, sim.accuracy(cand), sim.answer(cand, rng))


# ---- presets (calibrated to ../shared/real-answers.md; see describe_preset) ------------------------------
# Found by random search with local refinement on describe()'s statistics (without the 2PL fit), then
# checked with it; bench/README.md has the side-by-side table. MMLU-Pro math: a hard benchmark (b around 4)
# with floors from Beta(0.12, 1.06) (many near 0: weak models often answer nothing parsable), 40 % misfit
# items that mildly punish the skill, and one strong signed nuisance trait (PC2). ARC-Challenge: an easy,
# widely spread benchmark with 15 % misfit items of any sign and two nuisance traits.
MMLU_PRO_MATH = SimConfig(
    n_items=1351, choices=10, dims=2, ability_sd=(1.87, 1.0), ability_corr=0.08,
    a_log_mean=0.14, a_log_sd=0.41, nuisance_sd=(2.0,), b_mean=3.98, b_sd=2.44,
    guess_concentration=1.18, slip_max=0.064, misfit_share=0.40, misfit_mean=-0.53, misfit_sd=0.05,
)
ARC_CHALLENGE = SimConfig(
    n_items=735, choices=4, dims=3, ability_sd=(1.235, 1.0, 1.0), ability_corr=0.38,
    a_log_mean=0.47, a_log_sd=0.2, nuisance_sd=(0.25, 2.16), b_mean=-0.23, b_sd=5.0,
    guess_concentration=0.5, slip_max=0.0, misfit_share=0.15, misfit_mean=-1.26, misfit_sd=1.81,
)
PRESETS = {"mmlu_pro_math": MMLU_PRO_MATH, "arc_challenge": ARC_CHALLENGE}

# The real-answers table (../shared/real-answers.md), in describe()'s keys.
REAL = {
    "mmlu_pro_math": {
        "models": 1526, "items": 1351, "acc_mean": 0.231, "acc_sd": 0.073,
        "acc_q": (0.13, 0.19, 0.23, 0.26, 0.34), "p_q": (0.02, 0.06, 0.16, 0.33, 0.58),
        "itc_q": (-0.10, -0.02, 0.12, 0.36, 0.51), "itc_neg": 0.29, "itc_below_0.1": 0.48,
        "pca": (0.123, 0.102, 0.030), "disc_q": (0.17, 0.84, 7.50), "irt_mae": 1.84,
    },
    "arc_challenge": {
        "models": 320, "items": 735, "acc_mean": 0.647, "acc_sd": 0.072,
        "acc_q": (0.55, 0.60, 0.66, 0.70, 0.74), "p_q": (0.05, 0.32, 0.79, 0.97, 0.99),
        "itc_q": (-0.04, 0.08, 0.21, 0.36, 0.50), "itc_neg": 0.15, "itc_below_0.1": 0.29,
        "pca": (0.184, 0.095, 0.041), "disc_q": (0.20, 1.84, 5.01), "irt_mae": 2.54,
    },
}


# ---- statistics ------------------------------------------------------------------------------------------
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def item_total_correlation(responses) -> Array:
    """Corrected item-total correlation per item: corr(y_j, sum of the row's other answers); NaN for an
    item every model answers alike."""
    y = np.asarray(responses, dtype=np.float64)
    rest = y.sum(axis=1, keepdims=True) - y
    yc, rc = y - y.mean(0), rest - rest.mean(0)
    den = np.sqrt((yc ** 2).sum(0) * (rc ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (yc * rc).sum(0) / den, np.nan)


def describe(responses, *, fit_irt: bool = True, train_share: float = 0.6, seed: int = 0) -> dict:
    """The real-answers table's statistics of a [models, items] 0/1 matrix.

    acc_*: model accuracy mean, sd, quantiles (10/25/50/75/90 %); p_q: item p-value quantiles; itc_*:
    corrected item-total correlation quantiles, share below 0 and below 0.1 (items with a defined
    correlation); pca: variance shares of the first three principal components of the column-centred
    matrix. With ``fit_irt``: a 1-D 2PL (``fitness.irt.fit_item_params``, MAP) fitted on a random
    ``train_share`` of the models, its discrimination quantiles (10/50/90 %), and irt_mae: the mean
    absolute error, in accuracy points, of the accuracy it predicts for each held-out model at the
    ability (MLE) read on ALL its answers -- the 1-D model's own floor.
    """
    y = np.asarray(responses, dtype=np.float64)
    acc, pv = y.mean(axis=1), y.mean(axis=0)
    itc = item_total_correlation(y)
    itc = itc[np.isfinite(itc)]
    yc = y - pv
    gram = yc.T @ yc if y.shape[0] >= y.shape[1] else yc @ yc.T
    top = eigsh(gram, k=3, which="LA", return_eigenvectors=False)[::-1]  # the 3 largest, faster than all
    out = {
        "models": y.shape[0], "items": y.shape[1],
        "acc_mean": float(acc.mean()), "acc_sd": float(acc.std(ddof=1)),
        "acc_q": tuple(np.quantile(acc, QUANTILES).tolist()), "p_q": tuple(np.quantile(pv, QUANTILES).tolist()),
        "itc_q": tuple(np.quantile(itc, QUANTILES).tolist()),
        "itc_neg": float((itc < 0).mean()), "itc_below_0.1": float((itc < 0.1).mean()),
        "pca": tuple((np.sort(top)[::-1] / np.trace(gram)).tolist()),
    }
    if fit_irt:
        from fitness.irt import estimate_theta, fit_item_params

        rng = np.random.default_rng(seed)
        order = rng.permutation(y.shape[0])
        n_train = int(round(train_share * y.shape[0]))
        train, test = y[order[:n_train]], y[order[n_train:]]
        params = fit_item_params(train, "2pl")  # the priors keep all-right / all-wrong items finite
        theta = estimate_theta(test, params)
        pred = params.prob(theta).mean(axis=1)
        out["disc_q"] = tuple(np.quantile(params.a[:, 0], (0.1, 0.5, 0.9)).tolist())
        out["irt_mae"] = float(np.abs(pred - test.mean(axis=1)).mean() * 100)
    return out


def describe_preset(name: str, seed: int = 0, n_models: int | None = None, fit_irt: bool = True) -> dict:
    """describe() of a preset's simulated matrix with as many models as the real one (or n_models)."""
    cfg = PRESETS[name]
    sample = simulate(cfg, n_models or REAL[name]["models"], seed)
    return describe(sample.responses, fit_irt=fit_irt, seed=seed)

