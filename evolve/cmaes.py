"""CMA-ES for single-objective searches, behind pymoo's ask-and-tell interface.

CMA-ES (Hansen & Ostermeier 2001; tutorial: Hansen 2016, arXiv:1604.00772) samples each
generation from N(m, sigma^2 C) and adapts the mean m, the step size sigma and the
covariance C from the ranked samples. The work is done by the `cma` package (the
reference implementation by Hansen); this class only adapts it to the loop in
`search.py`: `setup`, `ask` -> a pymoo `Population`, `tell(infills=...)`.

Why not pymoo's own `CMAES`: in pymoo 0.6.2 it fails in `ask` on our bounded problems.
The search runs in the unit cube (`bounds [0, 1]`, cma's `BoundTransform`, so every
asked genome is inside the bounds), starting at its centre with sigma 0.25 (a quarter of
each parameter's range, as Hansen advises for x0 in the middle of the domain); genomes
are mapped affinely to the problem's bounds.

`cma` samples with `opts["randn"]` (by default a method of NumPy's global generator,
which a pickle would copy and then no longer follow) and seeds that global generator.
Here it samples from a `RandomState` of its own, pickled with it, and any other draw from
the global generator sees a private copy of it swapped in around every call, so the
pickled search state (search.py) resumes exactly and other code cannot shift the samples.
"""
from __future__ import annotations

import contextlib

import numpy as np
from pymoo.core.population import Population


class CMAES:
    """pymoo-style ask/tell CMA-ES for one objective (minimized, as pymoo's F)."""

    def __init__(self, pop_size: int, sigma: float = 0.25):
        self.pop_size, self.sigma = pop_size, sigma
        self.problem = None
        self._es = None
        self._rng = None
        self._asked: list[np.ndarray] | None = None

    @contextlib.contextmanager
    def _own_rng(self):
        outside = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            yield
        finally:
            self._rng = np.random.get_state()
            np.random.set_state(outside)

    def setup(self, problem, termination=None, seed: int = 0, verbose: bool = False, **_) -> "CMAES":
        import cma

        if problem.n_obj != 1:
            raise ValueError(f"search.algorithm: cmaes optimizes one objective, the problem has {problem.n_obj}")
        self.problem = problem
        outside = np.random.get_state()
        try:
            # cma takes seed 0 or None as "seed from the clock": shift to keep every seed fixed
            self._es = cma.CMAEvolutionStrategy(np.full(problem.n_var, 0.5), self.sigma, {
                "bounds": [0.0, 1.0], "popsize": self.pop_size, "seed": int(seed) + 1, "verbose": -9,
                "randn": np.random.RandomState(int(seed) + 1).randn})
            self._rng = np.random.get_state()
        finally:
            np.random.set_state(outside)
        return self

    def ask(self) -> Population:
        with self._own_rng():
            self._asked = [np.asarray(z, dtype=float) for z in self._es.ask()]
        xl, xu = np.asarray(self.problem.xl, dtype=float), np.asarray(self.problem.xu, dtype=float)
        X = np.clip(xl + np.stack(self._asked) * (xu - xl), xl, xu)
        return Population.new("X", X)

    def tell(self, infills: Population, **_) -> None:
        if self._asked is None:
            raise RuntimeError("CMAES.tell called without a preceding ask")
        F = np.asarray(infills.get("F"), dtype=float).reshape(len(self._asked), -1)[:, 0]
        with self._own_rng():
            self._es.tell(self._asked, F.tolist())
        self._asked = None
