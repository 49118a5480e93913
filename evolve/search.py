"""The search loop: pymoo ask-and-tell, a checkpoint after every generation, exact resume.

pymoo's algorithm keeps its own random generator (`algorithm.random_state`, pymoo >=
0.6.1.6), so pickling the algorithm after each `tell` captures the whole search state;
a resumed run asks for the same populations as an uninterrupted one, and the genomes
already scored are read back from `candidates.jsonl` instead of being evaluated again.
A crash loses at most the candidate being scored.

Algorithms: Bayesian optimization (`bo.py`, BoTorch inside a pymoo Algorithm; the default
for budgets up to 300 candidates), NSGA-II (the default above), NSGA-III, SMS-EMOA, MOEA/D
for several objectives; GA, CMA-ES (`cmaes.py`, the `cma` package behind the same ask/tell),
bo or NSGA-II for one. An evolutionary algorithm asks `generations` populations of
`population` genomes; `bo` asks population x generations genomes, `batch` at a time.
The state is written with cloudpickle, which also serializes the local
functions some of pymoo's operators keep (plain pickle refuses NSGA-III's). MOEA/D holds a
Python generator mid-run that nothing can pickle: it is not checkpointed, and a resume
replays it from its seed, which asks for the same genomes, all answered from the record.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import numpy as np
from pymoo.core.evaluator import Evaluator
from pymoo.core.termination import NoTermination

from core.fs import atomic_write

from .pareto import hypervolume, knee_point, non_dominated
from .problem import Candidate, CandidateEvaluator, MergeProblem, minimized

ALGORITHMS_MULTI = ("bo", "nsga2", "nsga3", "smsemoa", "moead")
ALGORITHMS_SINGLE = ("ga", "cmaes")
BO_MAX_BUDGET = 300  # the default algorithm is bo up to this many candidates, nsga2 above
STATE_FILE = "state.pkl"
CANDIDATES_FILE = "candidates.jsonl"
RUN_FILE = "run.json"


def default_algorithm(population: int, generations: int) -> str:
    """bo for the budgets one GPU affords, NSGA-II for larger ones."""
    return "bo" if population * generations <= BO_MAX_BUDGET else "nsga2"


def steps(algorithm: str, population: int, generations: int, batch: int) -> int:
    """How many asks the search makes: one per generation, or one per batch for bo."""
    return math.ceil(population * generations / batch) if algorithm == "bo" else generations


def make_algorithm(name: str, population: int, n_obj: int, *, batch: int = 1, initial=None,
                   ref_point: np.ndarray | None = None, trust_region: bool | None = None,
                   bounds: list[tuple[float, float] | None] | None = None):
    if n_obj > 1 and name not in ALGORITHMS_MULTI:
        raise ValueError(f"search.algorithm: {name} is not a multi-objective algorithm ({', '.join(ALGORITHMS_MULTI)})")
    if n_obj == 1 and name not in ALGORITHMS_SINGLE + ("nsga2", "bo"):
        raise ValueError(f"search.algorithm: with one objective use {', '.join(ALGORITHMS_SINGLE)}, bo or nsga2")
    from pymoo.util.ref_dirs import get_reference_directions

    if name == "bo":
        from .bo import BayesOpt
        return BayesOpt(batch=batch, initial=initial, ref_point=ref_point, trust_region=trust_region, bounds=bounds)
    if name == "nsga2":
        from pymoo.algorithms.moo.nsga2 import NSGA2
        return NSGA2(pop_size=population)
    if name == "nsga3":
        from pymoo.algorithms.moo.nsga3 import NSGA3
        return NSGA3(ref_dirs=get_reference_directions("energy", n_obj, population, seed=1), pop_size=population)
    if name == "smsemoa":
        from pymoo.algorithms.moo.sms import SMSEMOA
        return SMSEMOA(pop_size=population)
    if name == "moead":
        from pymoo.algorithms.moo.moead import MOEAD
        return MOEAD(ref_dirs=get_reference_directions("energy", n_obj, population, seed=1), n_neighbors=min(15, population))
    if name == "cmaes":
        from .cmaes import CMAES
        return CMAES(pop_size=population)
    from pymoo.algorithms.soo.nonconvex.ga import GA
    return GA(pop_size=population)


def read_candidates(path: Path) -> list[Candidate]:
    """Candidates recorded so far; a torn last line (a crash mid-write) is ignored."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(Candidate(**json.loads(line)))
            except (ValueError, TypeError):
                continue
    return out


@dataclass
class Progress:
    generation: int
    generations: int
    evaluations: int
    best: dict[str, float]
    hypervolume: float
    eta_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class SearchResult:
    candidates: list[Candidate]
    front: list[int]  # candidate ids on the final front
    knee: int  # candidate id
    hypervolume: float
    reference_point: list[float]
    overhead: dict[str, float] = field(default_factory=dict)  # the algorithm's own time per suggestion


def run_search(problem: MergeProblem, evaluator: CandidateEvaluator, out_dir: Path, *, algorithm: str = "nsga2",
               population: int = 16, generations: int = 8, seed: int = 0, resume: bool = False,
               fingerprint: str = "", callback: Callable[[Progress], None] | None = None,
               should_stop: Callable[[], bool] | None = None, batch: int = 1,
               initial: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               trust_region: bool | None = None) -> SearchResult:
    """Runs (or resumes) the search; writes state.pkl and candidates.jsonl in `out_dir`.
    `initial`: free observations (genomes, minimized objectives, their variances) that
    `bo` starts from (a job's probes); `batch`, `trust_region`: bo's, see bo.py."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, cand_path = out_dir / STATE_FILE, out_dir / CANDIDATES_FILE
    objectives = problem.objectives
    ref = np.array([o.to_min(o.worst) for o in objectives], dtype=float)
    run_path = out_dir / RUN_FILE
    algo, done = None, 0
    if resume and run_path.is_file():
        if json.loads(run_path.read_text())["fingerprint"] != fingerprint:
            raise ValueError(f"{out_dir}: the checkpoint belongs to a different spec; not resuming")
        if state_path.is_file():
            state = pickle.loads(state_path.read_bytes())
            algo, done = state["algorithm"], state["generation"]
            algo.problem = problem
    else:
        for p in (state_path, cand_path):
            p.unlink(missing_ok=True)
        atomic_write(run_path, json.dumps({"fingerprint": fingerprint}).encode())
    known = read_candidates(cand_path)
    evaluator.restore(known)
    if algo is None:
        algo = make_algorithm(algorithm, population, len(objectives), batch=batch, initial=initial, ref_point=ref,
                              trust_region=trust_region, bounds=[o.min_range() for o in objectives])
        algo.setup(problem, termination=NoTermination(), seed=seed, verbose=False)
    problem.evaluate_genomes = evaluator.evaluate
    checkpointable = algorithm != "moead"
    total = steps(algorithm, population, generations, batch)
    if callback and done and evaluator.candidates:  # a resumed run first reports where it stands
        F = _matrix(evaluator.candidates, objectives)
        callback(Progress(done, total, len(evaluator.candidates), _best(evaluator.candidates, objectives),
                          hypervolume(F, ref), None))

    with open(cand_path, "a") as log:
        def record(c: Candidate) -> None:
            log.write(json.dumps(c.to_json()) + "\n")
            log.flush()
            os.fsync(log.fileno())

        evaluator.on_new = record
        t_start, gens_this_run, own, asked = time.perf_counter(), 0, [], 0
        while done < total:
            if should_stop and should_stop():
                break
            evaluator.generation = done
            t0 = time.perf_counter()
            pop = algo.ask()
            t1 = time.perf_counter()
            Evaluator().eval(problem, pop)
            t2 = time.perf_counter()
            algo.tell(infills=pop)
            own.append(t1 - t0 + time.perf_counter() - t2)
            asked += len(pop) if hasattr(pop, "__len__") else 1  # MOEA/D asks one Individual
            done += 1
            gens_this_run += 1
            if checkpointable:
                atomic_write(state_path, cloudpickle.dumps(
                    {"algorithm": algo, "generation": done}))
            if callback:
                F = _matrix(evaluator.candidates, objectives)
                per_gen = (time.perf_counter() - t_start) / gens_this_run
                callback(Progress(done, total, len(evaluator.candidates),
                                  _best(evaluator.candidates, objectives), hypervolume(F, ref),
                                  per_gen * (total - done)))
        evaluator.on_new = None
    result = summarize(evaluator.candidates, objectives, ref)
    if own:
        result.overhead = {"asks": len(own), "suggestions": asked, "seconds_per_suggestion": sum(own) / max(asked, 1),
                           "max_seconds_per_ask": max(own)}
    return result


def _matrix(cands: list[Candidate], objectives) -> np.ndarray:
    return minimized([c.objectives for c in cands], objectives)


def _best(cands: list[Candidate], objectives) -> dict[str, float]:
    return {o.name: (max if o.sense == "max" else min)(c.objectives[o.name] for c in cands) for o in objectives}


def summarize(cands: list[Candidate], objectives, ref: np.ndarray) -> SearchResult:
    F = _matrix(cands, objectives)
    front = non_dominated(F)
    knee = int(front[knee_point(F[front])]) if len(front) else -1
    return SearchResult(cands, [cands[i].id for i in front], cands[knee].id if knee >= 0 else -1,
                        hypervolume(F[front], ref) if len(front) else 0.0, ref.tolist())
