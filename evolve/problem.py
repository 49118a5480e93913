"""The search problem: genome -> merged model in memory -> scored objectives.

`MergeProblem` is a pymoo `Problem` over the search space's bounds. Evaluating a genome
decodes it into per-tensor merge parameters, writes the candidate into the resident
model (`ResidentMerge.materialize`, no checkpoint) and asks the scorer for its objectives.
pymoo minimizes, so maximized objectives enter negated.

Every evaluation is keyed by a canonical hash of (genome, method, fixed parameters,
scorer settings): a genome seen before, in this run or before a resume, is never
evaluated twice.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from pymoo.core.problem import Problem

from fitness.fitness import Objective, Score

from .genome import SearchSpace


class Scorer(Protocol):
    """What the search needs from fitness: objectives, a cheap score and a full one."""

    objectives: list[Objective]

    def settings_key(self) -> str: ...

    def score(self, model, priors=None) -> Score: ...

    def score_full(self, model) -> Score: ...


@dataclass
class Candidate:
    id: int
    key: str
    generation: int
    genome: list[float]
    params: list[dict[str, Any]]
    objectives: dict[str, float]
    cost: dict[str, float] = field(default_factory=dict)
    true_objectives: dict[str, float] | None = None
    trace: dict[str, Any] | None = None  # adaptive subsets: items asked, answers, ability (Score.trace)
    sd: dict[str, float] | None = None  # each estimate's sd where its estimator reports one (Score.sd)

    def to_json(self) -> dict:
        return asdict(self)


def minimized(values: Sequence[dict[str, float]], objectives: Sequence[Objective]) -> np.ndarray:
    """Objective values [n, m] in pymoo's minimization form, from one {name: value} per row."""
    return np.array([[o.to_min(v[o.name]) for o in objectives] for v in values], dtype=float).reshape(
        -1, len(objectives))


def genome_key(x: Sequence[float], method: str, fixed: dict, settings: str) -> str:
    payload = json.dumps([[float(v).hex() for v in x], method, fixed, settings], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class MergeProblem(Problem):
    """pymoo's view: bounds and objective count. The evaluator (model and scorer) is attached
    at run time and never pickled with the algorithm's checkpoint."""

    def __init__(self, space: SearchSpace, objectives: Sequence[Objective]):
        xl, xu = space.bounds
        super().__init__(n_var=space.n_var, n_obj=len(objectives), xl=xl, xu=xu)
        self.objectives = list(objectives)
        self.evaluate_genomes: Callable[[np.ndarray], list[Candidate]] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["evaluate_genomes"] = None
        return state

    def _evaluate(self, X, out, *args, **kwargs):
        if self.evaluate_genomes is None:
            raise RuntimeError("MergeProblem has no evaluator attached")
        cands = self.evaluate_genomes(np.atleast_2d(X))
        out["F"] = minimized([c.objectives for c in cands], self.objectives)
        out["Fvar"] = np.array([[(c.sd or {}).get(o.name, np.nan) ** 2 for o in self.objectives] for c in cands])


class CandidateScorer:
    """One process's scoring of candidates: a genome written into its resident model, then
    scored. What the evaluators of `evolve.execution` run, one per process (or Ray actor)."""

    def __init__(self, space: SearchSpace, resident, scorer: Scorer):
        self.space, self.resident, self.scorer = space, resident, scorer

    def estimate(self, x, priors=None) -> tuple[Score, float]:
        """The candidate's estimated objectives, and the seconds its merge took."""
        t0 = time.perf_counter()
        model = self.resident.materialize(self.space.params_for_tensor(np.asarray(x)))
        t1 = time.perf_counter()
        return (self.scorer.score(model, priors=priors) if priors else self.scorer.score(model)), t1 - t0

    def full(self, x) -> dict[str, float]:
        """Full evaluation (the final check), on the exact merge that an export writes."""
        model = self.resident.materialize(self.space.params_for_tensor(np.asarray(x)), exact=True)
        return dict(self.scorer.score_full(model).values)


class CandidateEvaluator:
    """Genomes -> Candidates, with the cache and the record; a batch's new genomes are scored by
    the evaluators (`evolve.execution`: this process, or Ray actors in parallel) and recorded in
    the batch's order.

    The scorer's history (`subset.prior: population`, `surrogate`: each candidate's CAT prior is
    predicted from the probes, `probe_genomes` with their abilities in the scorer's fits, and the
    candidates scored before it, evolve/surrogate.py) moves between batches only: every genome of
    a batch gets its prior from the candidates of earlier batches (`generation`s), so a run is the
    same however many evaluators score it, and a run resumed in the middle of a batch rebuilds the
    same priors."""

    def __init__(self, space: SearchSpace, resident, scorer: Scorer, known: Sequence[Candidate] = (),
                 probe_genomes: np.ndarray | None = None, evaluators=None):
        from .execution import LocalPool

        self.space, self.resident, self.scorer = space, resident, scorer
        self.evaluators = evaluators or LocalPool(CandidateScorer(space, resident, scorer))
        self.settings = scorer.settings_key()
        self.probe_genomes = probe_genomes
        self.generation = 0
        self.on_new: Callable[[Candidate], None] | None = None
        self.evaluated = 0  # genomes scored in this process (cache misses)
        self._reset(known)

    def _reset(self, known: Sequence[Candidate]) -> None:
        self.by_key: dict[str, Candidate] = {c.key: c for c in known}
        self.candidates: list[Candidate] = list(known)
        self.unobserved: list[Candidate] = list(known)  # scored, not yet in the scorer's history
        self.surrogate = None
        keys = getattr(self.scorer, "surrogate_keys", [])
        if keys:
            from .surrogate import SurrogatePriors

            lo, hi = self.space.bounds
            self.surrogate = SurrogatePriors(lo, hi, {k: self.scorer.surrogate_min_sd(k) for k in keys})
            for i, x in enumerate(self.probe_genomes if self.probe_genomes is not None else []):
                self.surrogate.add(x, {k: self.scorer.fits[k].probe_thetas[i] for k in keys})

    def _observe_earlier_batches(self, everything: bool = False) -> None:
        now = [c for c in self.unobserved if everything or c.generation < self.generation]
        self.unobserved = self.unobserved[len(now):] if everything else [
            c for c in self.unobserved if c.generation >= self.generation]
        for c in now:
            if hasattr(self.scorer, "observe"):
                self.scorer.observe(c.trace)
            if self.surrogate is not None:
                self.surrogate.add(c.genome, {k: self.scorer.observed_ability(k, t) for k, t in (c.trace or {}).items()
                                              if k in self.surrogate.thetas})

    def _priors(self, x) -> dict:
        priors = {k: self.scorer.prior_for(k) for k in getattr(self.scorer, "populations", {})}
        return priors | (self.surrogate.priors(x) if self.surrogate is not None else {})

    def restore(self, known: Sequence[Candidate]) -> None:
        """Start from the recorded candidates (a resume): the cache, and the scorer's history
        where it keeps one (a population prior, the surrogate's observations), rebuilt in recorded order."""
        self._reset(known)
        if hasattr(self.scorer, "restore"):
            self.scorer.restore([])

    def key(self, x) -> str:
        return genome_key(x, self.space.method, self.space.fixed, self.settings)

    def candidate(self, x: np.ndarray) -> Candidate:
        """One genome as a batch of its own: its prior learns from every candidate before it."""
        return self.evaluate([x], after_all=True)[0]

    def evaluate(self, X, after_all: bool = False) -> list[Candidate]:
        """The candidates of genomes X (one batch), scoring the ones not seen before."""
        keys = [self.key(x) for x in X]
        new = list({k: x for k, x in zip(keys, X) if k not in self.by_key}.items())
        if new:
            self._observe_earlier_batches(after_all)
            tasks = [(np.asarray(x, dtype=float), self._priors(x)) for _, x in new]
            done: dict[int, tuple] = {}
            first = len(self.candidates)
            for i, result in self.evaluators.imap("estimate", tasks):
                done[i] = result
                while (j := len(self.candidates) - first) in done:  # recorded in the batch's order
                    self._record(*new[j], *done.pop(j))
        return [self.by_key[k] for k in keys]

    def _record(self, key: str, x, score: Score, merge_seconds: float) -> None:
        cost = {"items": score.items, "forward_passes": score.forward_passes,
                "merge_seconds": merge_seconds, "score_seconds": score.seconds}
        c = Candidate(len(self.candidates), key, self.generation, [float(v) for v in x],
                      self.space.decode(np.asarray(x)), dict(score.values), cost,
                      trace=getattr(score, "trace", None) or None, sd=dict(getattr(score, "sd", None) or {}) or None)
        self.by_key[key] = c
        self.candidates.append(c)
        self.unobserved.append(c)
        self.evaluated += 1
        if self.on_new:
            self.on_new(c)

    def true_objectives(self, cands: Sequence[Candidate]) -> list[dict[str, float]]:
        """Full evaluations of candidates (the final check), in order, spread over the evaluators."""
        out: list = [None] * len(cands)
        for i, values in self.evaluators.imap("full", [(np.array(c.genome),) for c in cands]):
            out[i] = values
        return out
