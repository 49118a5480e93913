"""Bayesian multi-objective optimization as a pymoo `Algorithm` (ask / tell).

At 50-300 expensive evaluations a surrogate model of the objectives beats evolutionary
search (Daulton et al. 2021, "Parallel Bayesian optimization of multiple noisy objectives
with expected hypervolume improvement", NeurIPS; Knowles 2006, ParEGO). pymoo stays the
frame (same `Problem`, loop, checkpoint and indicators); BoTorch fits the surrogates and
maximizes the acquisition inside `_infill`:

- one GP per objective (`SingleTaskGP`, Matern-5/2 with ARD on the unit-cube genome,
  outcomes standardized); its noise is fixed to each estimate's reported variance sd^2
  when every observation of that objective reports one (full evaluations count as exact),
  and inferred otherwise;
- an objective with a bounded range (`bounds`: an accuracy in [0, 1], mean output tokens in
  [0, max_new_tokens]) is modelled on the logit scale of that range, z = logit((y - lo) /
  (hi - lo)), its variance carried by the delta method, and mapped back through the sigmoid
  inside the acquisition, so hypervolumes are of the objectives themselves: a merge's
  accuracy moves between its models' like a sigmoid of the weights and densities (flat,
  then a jump), which a stationary GP fits badly on the accuracy scale and far better on
  the logit scale (the scale of an IRT ability);
- the acquisition is qLogNEHVI (Ament et al. 2023, "Unexpected improvements to expected
  improvement": the log of Daulton et al.'s noisy expected hypervolume improvement) for
  2-4 objectives, qLogNParEGO (random Chebyshev scalarizations) above that, and qLogNEI
  for one; q = `batch` points per ask, chosen greedily one after another;
- every `interleave`-th candidate after the initial design is a uniform draw from the search
  box instead of the acquisition's maximizer, the epsilon-greedy hedge under which expected
  improvement keeps its convergence rate when the GP's hyperparameters are wrong (Bull 2011,
  "Convergence rates of efficient global optimization algorithms", JMLR 12, Sec. 4): with
  three objectives 50-60 % of the candidates are non-dominated, and the draws spread them;
- the initial design is the free observations handed in (a job's probes, evaluated in full
  at Latin-hypercube points) followed by scrambled Sobol points up to 2(d+1) in all; the
  surrogates learn from the free observations, but the hypervolume to improve is that of the
  search's own candidates (the front a job reports), once it has any;
- above `trust_region_above` genes (per-block spaces) the acquisition is maximized inside a
  trust region (Eriksson et al. 2019, TuRBO; Daulton et al. 2022, MORBO for several
  objectives): a box of side L around the observed point with the largest exclusive
  hypervolume contribution, doubled after 3 successes (a batch that raises the observed
  front's hypervolume), halved after max(4, d / q) failures, restarted at L0 below L_min.

Acquisition settings (64 quasi-MC samples, 4 restarts from the best of 128 raw points) are
what keeps a suggestion at a few seconds on one CPU thread: with 128 / 8 / 256 an ask at 60
observations and 3 objectives took 9.5 s against 3.5 s, most of it the hypervolume box
decompositions, one per MC sample.

Everything random comes from pymoo's seeded generator (`random_state`): each ask draws
one torch seed, so an algorithm pickled after a `tell` asks the same genomes when resumed.
Surrogates are refitted from the stored observations at every ask, never pickled.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from pymoo.core.algorithm import Algorithm
from pymoo.core.population import Population

from .pareto import hypervolume, non_dominated

VAR_FLOOR = 1e-6  # the noise variance of an exact (fully evaluated) observation, for the GP's conditioning


@dataclass
class TrustRegion:
    """TuRBO's box state (Eriksson et al. 2019, Alg. 1): side, counters, tolerances."""

    length: float = 0.8
    length_min: float = 0.5 ** 7
    length_max: float = 1.6
    successes: int = 0
    failures: int = 0
    success_tolerance: int = 3
    failure_tolerance: int = 4
    restarts: int = 0

    def update(self, improved: bool) -> None:
        if improved:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        if self.successes >= self.success_tolerance:
            self.length, self.successes = min(2 * self.length, self.length_max), 0
        elif self.failures >= self.failure_tolerance:
            self.length, self.failures = self.length / 2, 0
        if self.length < self.length_min:
            self.length, self.restarts = TrustRegion.length, self.restarts + 1


class BayesOpt(Algorithm):
    """Ask: q new genomes (initial design first, then the acquisition's maximizers and, every
    `interleave`-th candidate, a uniform draw); tell: their objectives (`F`, minimized) and
    optional variances (`Fvar`, NaN when unknown). `bounds`: per objective, its range (lo, hi)
    in minimized units, or None where it is unbounded (modelled as is)."""

    bounds: list[tuple[float, float] | None] | None = None  # class defaults: a checkpoint pickled before
    interleave: int = 0  # these existed resumes as it ran

    def __init__(self, batch: int = 1, initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 ref_point: np.ndarray | None = None, n_init: int | None = None, trust_region: bool | None = None,
                 trust_region_above: int = 12, restarts: int = 4, raw_samples: int = 128, mc_samples: int = 64,
                 bounds: list[tuple[float, float] | None] | None = None, interleave: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.batch, self.initial, self.ref_point = batch, initial, ref_point
        self.bounds, self.interleave = bounds, interleave
        self.n_init, self.trust_region, self.trust_region_above = n_init, trust_region, trust_region_above
        self.restarts, self.raw_samples, self.mc_samples = restarts, raw_samples, mc_samples
        self.suggest_seconds: list[float] = []

    def _setup(self, problem, **kwargs):
        d, m = problem.n_var, problem.n_obj
        self.lower, self.upper = np.asarray(problem.xl, float), np.asarray(problem.xu, float)
        self.U, self.F, self.Fvar = np.zeros((0, d)), np.zeros((0, m)), np.zeros((0, m))
        self.n_free = 0 if self.initial is None else len(self.initial[0])
        if self.initial is not None:
            X, F, Fvar = (np.asarray(a, float) for a in self.initial)
            self._observe(self._to_unit(X.reshape(-1, d)), F.reshape(-1, m), Fvar.reshape(-1, m))
        n_sobol = max(0, 2 * (d + 1) - len(self.U)) if self.n_init is None else self.n_init
        from torch.quasirandom import SobolEngine

        seed = int(self.random_state.integers(2**31))
        engine = SobolEngine(d, scramble=True, seed=seed)
        self.sobol = engine.draw(n_sobol).double().numpy() if n_sobol else np.zeros((0, d))
        self.sobol_used = 0
        use_tr = d > self.trust_region_above if self.trust_region is None else self.trust_region
        self.tr = TrustRegion(failure_tolerance=max(4, math.ceil(d / self.batch))) if use_tr else None

    def _to_unit(self, X: np.ndarray) -> np.ndarray:
        return (X - self.lower) / np.where(self.upper > self.lower, self.upper - self.lower, 1.0)

    def _from_unit(self, U: np.ndarray) -> np.ndarray:
        return np.clip(self.lower + U * (self.upper - self.lower), self.lower, self.upper)

    def _observe(self, U, F, Fvar) -> None:
        self.U, self.F, self.Fvar = np.vstack([self.U, U]), np.vstack([self.F, F]), np.vstack([self.Fvar, Fvar])

    def _draws_next(self, pending: int) -> bool:
        """Whether the next candidate is an interleaved uniform draw: the k-th after the initial
        design (k = 0, 1, ...) is one when k % interleave == interleave - 1 (the acquisition first)."""
        k = len(self.U) + pending - self.n_free - len(self.sobol)
        return bool(self.interleave) and k >= 0 and k % self.interleave == self.interleave - 1

    def _initialize_infill(self):
        return self._infill()

    def _initialize_advance(self, infills=None, **kwargs):
        self._advance(infills=infills, **kwargs)

    def _infill(self):
        q, U = self.batch, []
        while len(U) < q and self.sobol_used < len(self.sobol):
            U.append(self.sobol[self.sobol_used])
            self.sobol_used += 1
        while len(U) < q and self._draws_next(len(U)):
            U.append(self._uniform())
        if len(U) < q:
            t0 = time.perf_counter()
            U += list(self._suggest(q - len(U), np.array(U).reshape(-1, self.U.shape[1])))
            self.suggest_seconds.append(time.perf_counter() - t0)
        return Population.new(X=self._from_unit(self._distinct(np.array(U))))

    def _advance(self, infills=None, **kwargs):
        U = self._to_unit(infills.get("X"))
        F = infills.get("F")
        Fvar = np.array([np.nan if v is None else v for v in np.ravel(infills.get("Fvar"))], dtype=object)
        Fvar = Fvar.astype(float).reshape(F.shape) if Fvar.size == F.size else np.full_like(F, np.nan)
        before = self._front_hypervolume()
        self._observe(U, F, Fvar)
        if self.tr is not None and self.sobol_used >= len(self.sobol):
            self.tr.update(self._front_hypervolume() > before + 1e-12)
        self.pop = Population.new(X=self._from_unit(self.U), F=self.F)
        self.opt = self.pop[non_dominated(self.F)]

    def _ref(self) -> np.ndarray:
        """The hypervolume reference point (minimization): the given one, else the observed
        nadir pushed out by a tenth of the range."""
        if self.ref_point is not None:
            return np.asarray(self.ref_point, float)
        lo, hi = self.F.min(0), self.F.max(0)
        return hi + 0.1 * np.maximum(hi - lo, 1e-9)

    def _own(self) -> slice:
        """The search's own observations (after the free ones) once it has some: the front it
        improves is the one it reports, which the free observations (a job's probes) are not on."""
        return slice(self.n_free if len(self.U) > self.n_free else 0, None)

    def _front_hypervolume(self) -> float:
        F = self.F[self._own()]
        if not len(F):
            return 0.0
        return hypervolume(F[non_dominated(F)], self._ref())

    def _distinct(self, U: np.ndarray) -> np.ndarray:
        """Replaces a proposal that repeats an observed or already proposed genome (a scored
        genome answers from the cache and teaches nothing) by a random point of the search box."""
        out = []
        for u in U:
            seen = np.vstack([self.U, *out]) if out else self.U
            while len(seen) and np.min(np.abs(seen - u).max(1)) < 1e-9:
                u = self._uniform()
            out.append(u)
        return np.array(out)

    def _uniform(self) -> np.ndarray:
        """A uniform draw from the search box (the trust region where there is one)."""
        lo, hi = self._box()
        return lo + self.random_state.random(len(lo)) * (hi - lo)

    def _box(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the acquisition is maximized: the unit cube, or the trust region around its center."""
        d = self.U.shape[1]
        if self.tr is None or not len(self.U):
            return np.zeros(d), np.ones(d)
        U, F = self.U[self._own()], self.F[self._own()]
        front = non_dominated(F)
        ref = self._ref()
        if F.shape[1] == 1:
            center = U[int(np.argmin(F[:, 0]))]
        else:
            total = hypervolume(F[front], ref)
            gain = [total - hypervolume(F[np.delete(front, i)], ref) for i in range(len(front))]
            center = U[front[int(np.argmax(gain))]]
        half = self.tr.length / 2
        return np.clip(center - half, 0, 1), np.clip(center + half, 0, 1)

    def _suggest(self, q: int, pending: np.ndarray) -> np.ndarray:
        import torch

        seed = int(self.random_state.integers(2**31))
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jitter and restart notices of the GP fit and the optimizer
            torch.manual_seed(seed)
            return self._acquire(q, pending, seed)

    def _acquire(self, q: int, pending: np.ndarray, seed: int) -> np.ndarray:
        import torch
        from botorch.optim import optimize_acqf
        from botorch.sampling import SobolQMCNormalSampler

        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        m = self.F.shape[1]
        scale = OutcomeScale(self.bounds, m)
        Z, Zvar = scale.forward(self.F, self.Fvar)
        model = fit_surrogate(self.U, -Z, Zvar)  # BoTorch maximizes
        objective = scale.objective(single=m == 1)
        X_base = t(self.U[self._own()])
        sampler = SobolQMCNormalSampler(torch.Size([self.mc_samples]), seed=seed)
        X_pending = t(pending) if len(pending) else None
        if m == 1:
            from botorch.acquisition.logei import qLogNoisyExpectedImprovement

            acq = qLogNoisyExpectedImprovement(model, X_base, sampler=sampler, X_pending=X_pending, objective=objective)
        elif m <= 4:
            from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement

            acq = qLogNoisyExpectedHypervolumeImprovement(model, (-self._ref()).tolist(), X_base, sampler=sampler,
                                                          X_pending=X_pending, prune_baseline=True, objective=objective)
        else:
            from botorch.acquisition.multi_objective.parego import qLogNParEGO
            from botorch.utils.sampling import sample_simplex

            w = sample_simplex(m, dtype=torch.float64).squeeze(0)
            acq = qLogNParEGO(model, X_base, scalarization_weights=w, sampler=sampler, X_pending=X_pending,
                              prune_baseline=True, objective=objective)
        lo, hi = self._box()
        X, _ = optimize_acqf(acq, bounds=t(np.stack([lo, hi])), q=q, num_restarts=self.restarts,
                             raw_samples=self.raw_samples, sequential=True, options={"batch_limit": 4, "maxiter": 200})
        return X.detach().numpy().reshape(q, -1)

    @property
    def overhead(self) -> dict[str, float]:
        """Seconds per surrogate-driven ask (GP fits and acquisition maximization)."""
        s = np.array(self.suggest_seconds)
        return {"asks": len(s), "mean_seconds": float(s.mean()) if len(s) else 0.0,
                "max_seconds": float(s.max()) if len(s) else 0.0}


class OutcomeScale:
    """The scale the GPs model each objective on: the logit of its position in its bounded range
    (clipped to [EPS, 1 - EPS]; the variance by the delta method), or the objective as is.
    `objective()` maps the GPs' samples back and negates them, for BoTorch's maximization."""

    EPS = 0.005  # an accuracy within half a point of its bound reads as that half point

    def __init__(self, bounds: list[tuple[float, float] | None] | None, m: int):
        bounds = bounds or [None] * m
        self.logit = np.array([b is not None for b in bounds])
        self.lo = np.array([b[0] if b is not None else 0.0 for b in bounds], float)
        self.width = np.array([b[1] - b[0] if b is not None else 1.0 for b in bounds], float)

    def forward(self, F: np.ndarray, Fvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.clip((F - self.lo) / self.width, self.EPS, 1 - self.EPS)
        Z = np.where(self.logit, np.log(p / (1 - p)), F)
        return Z, np.where(self.logit, Fvar / (self.width * p * (1 - p)) ** 2, Fvar)

    def objective(self, single: bool = False):
        """None when no objective is rescaled; else BoTorch's objective -F(samples of -Z)."""
        if not self.logit.any():
            return None
        import torch
        from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
        from botorch.acquisition.objective import GenericMCObjective

        mask, lo, width = (torch.as_tensor(a) for a in (self.logit, self.lo, self.width))

        def back(samples, X=None):  # samples of -Z, maximized; returns -F
            return torch.where(mask, -(lo + width * torch.sigmoid(-samples)), samples)

        return GenericMCObjective(lambda s, X=None: back(s)[..., 0]) if single else GenericMCMultiOutputObjective(back)


def fit_surrogate(U: np.ndarray, Y: np.ndarray, Yvar: np.ndarray):
    """Independent GPs, one per output column of Y (maximized) over the unit cube U: fixed
    noise Yvar where every entry of the column is known (floored at VAR_FLOOR), inferred
    noise otherwise; hyperparameters by maximum marginal likelihood."""
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import ModelListGP, SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    models = []
    for j in range(Y.shape[1]):
        y, v = Y[:, j:j + 1], Yvar[:, j:j + 1]
        noise = t(np.maximum(v, VAR_FLOOR)) if not np.isnan(v).any() else None
        gp = SingleTaskGP(t(U), t(y), noise)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jitter notices and retries of the optimizer
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        models.append(gp)
    return models[0] if len(models) == 1 else ModelListGP(*models)
