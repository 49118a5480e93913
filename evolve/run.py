"""An evolve job from spec to Pareto front: `run(spec, out_dir)` and `export(out_dir, cid, dir)`.

Stages (each reported to the hooks as {"type": "stage", "stage": ...}):
1. endpoints: the base and every model are evaluated on the full benchmarks once per
   machine (response cache; an adapter is first merged into a cached full folder);
2. probes: a few random merges of the job's own kind (its method at Latin-hypercube points of
   its search space, seeded) are evaluated in full; they enrich the IRT fit with rows like
   the candidates it will score, and give the entropy subset its disagreement signal. Their answers
   are cached per machine like the endpoints' (keyed by the probe's parameters and the
   inputs' content hashes), so a repeated or resumed job does not evaluate them again;
   the cost report counts them as a first run pays them. Batches of more probes follow while the
   last batch improved the item fit and the probes stay cheap next to the search (fitness.probes);
3. irt: item parameters, endpoint abilities and subsets (`fitness.Fitness.fit`);
4. search: pymoo over the search space, candidates materialized in memory and scored on
   the subsets; progress events after every generation; checkpointed for `resume`;
5. final_check: front members evaluated on the full benchmarks, so the true objectives
   stand next to the estimates: at most `final_check.members` of them (the knee, each
   objective's best, then evenly spread members; `all` for every one). When every
   objective's estimator is `full`, the search's values are already exact and are copied.
The probes' full scores are the free initial data of `bo`. Stages 1, 2, 4 and 5 run on the job's
evaluators (`execution`: this process, or N Ray actors in parallel, evolve/execution.py); the IRT
fit and the search's own decisions stay in this process, the driver.
Outputs in out_dir: spec.json, candidates.jsonl, front.json, front.png (and state.pkl).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.fs import atomic_file, atomic_write
from core.hashing import content_hash
from core.hooks import NO_HOOKS, Hooks
from core.locks import exclusive
from core.validation import strict_spec
from data.benchmarks import load_benchmark
from fitness.evaluate import Responses
from fitness.fitness import Fitness, benchmark_paths
from fitness.probes import probe_budget
from merging.engine import merge
from merging.methods import get_method
from merging.spec import MergeSpec
from merging.task_vectors import open_inputs

from .evaluator import Evaluator, endpoint_folder, resident_merge, search_space  # noqa: F401
from .genome import SearchSpace
from .materialize import ResidentMerge
from .plan import Plan, check_plan, plan_job
from .problem import Candidate, CandidateEvaluator, MergeProblem, minimized
from .search import CANDIDATES_FILE, RUN_FILE, read_candidates, run_search
from .spec import EvolveSpec


@dataclass
class EvolveResult:
    front: list[dict[str, Any]]
    knee: int
    hypervolume: float
    true_hypervolume: float | None
    cost: dict[str, Any]
    out_dir: Path
    objectives: list[dict[str, str]]  # in order: name, sense (max or min)
    complete: bool  # false when the hooks stopped the search early


def probe_genomes(space: SearchSpace, n: int, seed: int) -> np.ndarray:
    """n points of the search space by Latin hypercube sampling: every gene's range split in n
    strata, each stratum hit once, so a few probes span weak to strong merges on every axis."""
    from scipy.stats import qmc

    low, high = space.bounds
    return low + qmc.LatinHypercube(d=space.n_var, seed=seed).random(n) * (high - low)


def recipe_digest(recipe: Mapping[str, Any], inputs: list[str]) -> str:
    """Names an in-memory merge for the response cache: its recipe and its inputs' content hashes."""
    return hashlib.sha256(json.dumps({**recipe, "inputs": inputs}).encode()).hexdigest()


INPUTS_FILE = "inputs.json"


def input_hashes(spec: EvolveSpec) -> dict[str, Any]:
    """Content hashes of the base and the models (memoized per machine, see content_hash)."""
    return {"base": content_hash(spec.base), "models": [content_hash(m.path) for m in spec.models]}


def probe_recipes(spec: EvolveSpec, space: SearchSpace | None = None, batch: int = 0) -> list[tuple[np.ndarray, str]]:
    """The job's probe merges: (genome, digest naming their answers in the response cache);
    `space`: the job's search space when the caller has built it already. Batch 0 is the first
    ``irt.probes``; batch j >= 1 the j-th ``irt.probe_batch`` more (`fitness.probes`), each its own
    Latin hypercube (seed + j)."""
    irt = spec.evaluation.irt
    space, n = space or search_space(spec), irt.probes if batch == 0 else irt.probe_batch
    hashes = input_hashes(spec)
    inputs = [hashes["base"], *hashes["models"]]
    return [(x, recipe_digest({"probe": spec.method, "blocks": space.decode(x)}, inputs))
            for x in (probe_genomes(space, n, irt.seed + batch) if n else [])]


def probe_batches(spec: EvolveSpec) -> int:
    """How many batches of probes a job may evaluate (the first included)."""
    irt = spec.evaluation.irt
    return 1 + (-(-irt.more_probes // irt.probe_batch) if irt.probes else 0)


def search_items(spec: EvolveSpec, benches: Mapping[str, Any]) -> int:
    """The items the search will score: candidates x subset size (at most the benchmark's items),
    summed over benchmarks; what `fitness.probes.probe_budget` weighs the probes against."""
    sizes = {str(o.benchmark): o.subset.size for o in spec.objectives}
    return spec.search.population * spec.search.generations * sum(min(sizes[k], len(b)) for k, b in benches.items())


def check_inputs_unchanged(out: Path, spec: EvolveSpec) -> None:
    """Refuses a run folder whose base or models changed on disk since it was scored: its
    candidates' objectives were measured on the old weights (resume and export both check)."""
    if not (out / INPUTS_FILE).is_file():
        return  # a run from before inputs were recorded
    then, now = json.loads((out / INPUTS_FILE).read_text()), input_hashes(spec)
    changed = (["base"] if then["base"] != now["base"] else []) + [
        f"models[{i}] ({spec.models[i].path})" for i, (a, b) in enumerate(zip(then["models"], now["models"])) if a != b]
    if changed:
        raise ValueError(f"{out}: {', '.join(changed)} changed on disk since this run scored its candidates")


def claim_run_folder(out: Path, spec: EvolveSpec, resume: bool, overwrite: bool) -> None:
    """Checks, before anything is written or evaluated, that `out` may hold this run: a folder
    holding a run is continued only with `resume` (same spec, same inputs) and replaced only with
    `overwrite`; the inputs must open as models that fit the base (the checks `merge` makes)."""
    try:
        open_inputs(spec.base, [m.path for m in spec.models], spec.tokenizer)
    except OSError as e:
        raise ValueError(str(e)) from None
    held = (out / RUN_FILE).is_file() or (out / CANDIDATES_FILE).is_file()
    if held and not (resume or overwrite):
        raise ValueError(f"{out}: holds an evolve run; resume it (--resume) or start over (--overwrite)")
    if resume and (out / RUN_FILE).is_file():
        if json.loads((out / RUN_FILE).read_text()).get("fingerprint") != _fingerprint(spec):
            raise ValueError(f"{out}: the checkpoint belongs to a different spec; not resuming")
        check_inputs_unchanged(out, spec)


def _fingerprint(spec: EvolveSpec) -> str:
    """What a checkpoint must match to be resumed: everything but where it runs and how it is saved,
    and the method's version where it is not 1 (the candidates it scored would not be merged alike)."""
    text = spec.model_dump_json(exclude={"device", "output", "execution"})
    version = get_method(spec.method).version
    return hashlib.sha256((text + (f"|{spec.method} v{version}" if version != 1 else "")).encode()).hexdigest()


@dataclass
class Setup:
    """What a search needs, built once per job by `setup`."""

    fitness: Fitness
    resident: ResidentMerge | None  # the local evaluator's (None when the evaluators are Ray actors)
    space: SearchSpace
    benches: dict[str, Any]
    cost: dict[str, Any]
    probes: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # genomes, minimized objectives, variances (0)
    evaluators: Any = None  # evolve.execution's LocalPool or RayPool


def ray_placement(spec: EvolveSpec):
    """Joins the spec's Ray cluster; returns its execution spec with the evaluators' GPUs settled
    (1 when the job's device is cuda, or auto and the cluster has GPUs) and their device."""
    from .execution import connect, wants_gpu

    x = spec.execution
    connect(x.address)
    gpus = x.gpus_per_evaluator
    if gpus is None:
        gpus = 1 if wants_gpu(spec.device) else 0
    return x.model_copy(update={"gpus_per_evaluator": gpus}), "cuda" if gpus else "cpu"


def job_plan(spec: EvolveSpec) -> Plan:
    """The plan the job runs by: this machine's (`check_plan`) for the local backend; for Ray, the
    plan on the evaluators' device without budgets (each actor checks its own machine's)."""
    if spec.execution.backend == "local":
        return check_plan(spec)
    _, device = ray_placement(spec)
    return plan_job(spec, gpu_memory=math.inf, host_memory=math.inf, device=device)


def open_evaluators(spec: EvolveSpec, plan: Plan):
    """The job's evaluators (`spec.execution`): this process, or Ray actors; see evolve/execution.py."""
    from .execution import open_pool

    if spec.execution.backend == "local":
        return open_pool(spec.execution, Evaluator, (), host_bytes=0, local=lambda: Evaluator(spec, plan))
    x, device = ray_placement(spec)
    return open_pool(x, Evaluator, (spec.model_copy(update={"device": device}), None, x.cpus_per_evaluator),
                     host_bytes=plan.totals["host"], local=None)


def setup(spec: EvolveSpec, hooks: Hooks = NO_HOOKS, plan: Plan | None = None, evaluators=None) -> Setup:
    """Stages 1-3 (endpoints, probes, irt) on the job's evaluators (opened here unless given),
    and the search space of stage 4."""
    plan = plan or job_plan(spec)
    evaluators = evaluators if evaluators is not None else open_evaluators(spec, plan)
    ev = spec.evaluation.model_copy(update={"batch_size": plan.batch_size})  # auto: the plan's batch
    benches = {str(p): load_benchmark(p) for p in benchmark_paths(spec.objectives)}
    per_answer_set = sum(len(b) for b in benches.values())
    cost = {"endpoint_items": 0, "probe_items": 0, "search_items": 0, "final_items": 0}

    hooks.emit({"type": "stage", "stage": "endpoints"})
    endpoints: dict[str, list[Responses]] = {k: [None] * (1 + len(spec.models)) for k in benches}
    for i, answers in evaluators.imap("endpoint", [(i,) for i in range(1 + len(spec.models))]):
        for k in benches:
            endpoints[k][i] = answers[k]
        cost["endpoint_items"] += per_answer_set

    from transformers import AutoTokenizer

    tokenizer, irt = AutoTokenizer.from_pretrained(spec.base), spec.evaluation.irt
    space, recipes = search_space(spec), []
    probes: dict[str, list[Responses]] = {k: [] for k in benches}
    budget, most = search_items(spec, benches), irt.probes + irt.more_probes
    for batch in range(probe_batches(spec)):  # the first probes, then batches while they pay (fitness.probes)
        hooks.emit({"type": "stage", "stage": "probes", **({"batch": batch} if batch else {})})
        new = probe_recipes(spec, space, batch)[: most - len(recipes)]
        for k in benches:
            probes[k] += [None] * len(new)
        for i, answers in evaluators.imap("probe", new):
            for k in benches:
                probes[k][len(recipes) + i] = answers[k]
            cost["probe_items"] += per_answer_set  # counted as a first run pays it, cached or not
        recipes += new
        hooks.emit({"type": "stage", "stage": "irt"})
        more = probe_budget(len(recipes), irt.probe_batch, most, irt.probe_share, per_answer_set, budget) > len(recipes)
        fitness = Fitness.fit(spec.objectives, ev, tokenizer, endpoints, probes, device=spec.device,
                              new_probes=len(new) if batch and more else 0)
        gains = {k: f.probe_gain for k, f in fitness.fits.items() if f.probe_gain is not None}
        if gains:
            hooks.emit({"type": "probe_gain", "probes": len(recipes), "benchmarks": {k: g.to_json() for k, g in gains.items()}})
        more = more and (not batch or any(g.helped for g in gains.values()))
        if not more:
            break
    hooks.emit({"type": "irt", "benchmarks": fitness.describe(), "probes": len(recipes)})
    evaluators.broadcast("set_fitness", fitness)

    initial = None
    if recipes:
        values = [fitness.full_values({k: probes[k][i] for k in benches}) for i in range(len(recipes))]
        F = minimized(values, fitness.objectives)
        initial = (np.array([x for x, _ in recipes]), F, np.zeros_like(F))
    resident = evaluators.evaluator.resident if hasattr(evaluators, "evaluator") else None
    return Setup(fitness, resident, space, benches, cost, initial, evaluators)


def run(spec: EvolveSpec | Mapping[str, Any], out_dir: str | os.PathLike, *, hooks: Hooks = NO_HOOKS,
        resume: bool = False, overwrite: bool = False) -> EvolveResult:
    """Runs the job in `out_dir` (see the module docstring); `resume` continues the run there,
    `overwrite` replaces one; with neither, a folder holding a run is refused. `hooks` get the
    stage and progress events; when they ask to stop, the search ends after the candidate being
    scored and the result is the front so far (`complete` false; `resume` continues it)."""
    spec = strict_spec(EvolveSpec, spec)
    with exclusive(out_dir, "an evolve run"):  # one process per run folder
        return _run(spec, Path(out_dir), hooks, resume, overwrite)


def _run(spec: EvolveSpec, out: Path, hooks: Hooks, resume: bool, overwrite: bool) -> EvolveResult:
    claim_run_folder(out, spec, resume, overwrite)
    plan = job_plan(spec)  # a job that cannot fit is refused before anything is written or loaded
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "spec.json", spec.model_dump_json(indent=2))
    atomic_write(out / INPUTS_FILE, json.dumps(input_hashes(spec), indent=2))
    evaluators = open_evaluators(spec, plan)
    try:
        return _search(spec, out, hooks, resume, setup(spec, hooks, plan, evaluators))
    finally:
        evaluators.close()


def _search(spec: EvolveSpec, out: Path, hooks: Hooks, resume: bool, job: Setup) -> EvolveResult:
    """Stages 4 and 5 (search, final check) and the run's outputs."""
    fitness, space, benches, cost, evaluators = job.fitness, job.space, job.benches, job.cost, job.evaluators
    hooks.emit({"type": "stage", "stage": "search"})
    problem = MergeProblem(space, fitness.objectives)
    evaluator = CandidateEvaluator(space, job.resident, fitness, probe_genomes=job.probes[0] if job.probes else None,
                                   evaluators=evaluators)
    s = spec.search

    def progress(p) -> None:
        hooks.emit({"type": "progress", **p.to_json(), "evaluators": evaluators.describe()})

    result = run_search(problem, evaluator, out, algorithm=s.algorithm, population=s.population,
                        generations=s.generations, seed=s.seed, resume=resume, fingerprint=_fingerprint(spec),
                        callback=progress, should_stop=hooks.should_stop, batch=s.batch, initial=job.probes,
                        trust_region={"auto": None, "on": True, "off": False}[s.trust_region])
    cands = result.candidates
    cost["search_items"] = int(sum(c.cost.get("items", 0) for c in cands))
    cost["candidates"] = len(cands)
    cost["evaluated_this_run"] = evaluator.evaluated
    if result.overhead:
        cost["search_overhead"] = result.overhead

    true_hv = None
    complete = not hooks.stopping()
    if spec.final_check is not None and complete:
        hooks.emit({"type": "stage", "stage": "final_check"})
        exact = all(o.estimator == "full" for o in spec.objectives)  # the search already measured them
        from .pareto import checked_members

        members = spec.final_check.members
        F_front = minimized([cands[i].objectives for i in result.front], fitness.objectives)
        checked = [result.front[j] for j in checked_members(F_front, result.front.index(result.knee),
                                                            None if members == "all" else members)]
        cost["final_checked"] = len(checked)
        todo = [cands[cid] for cid in checked if cands[cid].true_objectives is None]
        if exact:
            for c in todo:
                c.true_objectives = dict(c.objectives)
        else:
            for c, values in zip(todo, evaluator.true_objectives(todo)):
                c.true_objectives = values
            cost["final_items"] += len(todo) * sum(len(b) for b in benches.values())
        from .pareto import hypervolume

        F = minimized([cands[i].true_objectives for i in checked], fitness.objectives)
        true_hv = hypervolume(F, np.array(result.reference_point))
        _rewrite_candidates(out / CANDIDATES_FILE, cands)
    full_per_candidate = sum(len(b) for b in benches.values())
    cost["items_per_candidate"] = cost["search_items"] / max(len(cands), 1)
    cost["full_items_per_candidate"] = full_per_candidate
    spent = cost["probe_items"] + cost["search_items"]
    cost["item_ratio_vs_full"] = (full_per_candidate * len(cands)) / spent if spent else None
    cost["evaluators"] = evaluators.describe()
    front = [_front_entry(cands[i], i == result.knee) for i in result.front]
    objectives = [{"name": o.name, "sense": o.sense} for o in fitness.objectives]
    res = EvolveResult(front, result.knee, result.hypervolume, true_hv, cost, out, objectives, complete)
    doc = {"objectives": [o.__dict__ for o in fitness.objectives], "front": front, "knee": result.knee,
           "hypervolume": result.hypervolume, "true_hypervolume": true_hv, "reference_point": result.reference_point,
           "cost": cost, "fitness": fitness.describe(), "complete": complete}
    atomic_write(out / "front.json", json.dumps(doc, indent=2))
    plot_front(out / "front.png", cands, result.front, fitness.objectives)
    hooks.emit({"type": "done", "knee": result.knee, "front": len(front)})
    return res


def _front_entry(c: Candidate, knee: bool) -> dict[str, Any]:
    return {"id": c.id, "params": c.params, "objectives": c.objectives, "sd": c.sd,
            "true_objectives": c.true_objectives, "genome": c.genome, "knee": knee}


def _rewrite_candidates(path: Path, cands: list[Candidate]) -> None:
    atomic_write(path, "".join(json.dumps(c.to_json()) + "\n" for c in cands))


def plot_front(path: Path, cands: list[Candidate], front: list[int], objectives) -> None:
    """Scatter of every candidate over the first two objectives, the front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o.name for o in objectives]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    x = [c.objectives[names[0]] for c in cands]
    y = [c.objectives[names[1]] for c in cands] if len(names) > 1 else [c.generation for c in cands]
    ax.scatter(x, y, s=14, c="#bbbbbb", label="candidates")
    fx = [cands[i].objectives[names[0]] for i in front]
    fy = [cands[i].objectives[names[1]] if len(names) > 1 else cands[i].generation for i in front]
    ax.scatter(fx, fy, s=30, c="#d62728", label="Pareto front")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1] if len(names) > 1 else "generation")
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def load_run(out_dir: str | os.PathLike) -> tuple[EvolveSpec, list[Candidate]]:
    out = Path(out_dir)
    if not (out / "spec.json").is_file():
        raise ValueError(f"{out}: not an evolve run folder (no spec.json)")
    spec = EvolveSpec.model_validate_json((out / "spec.json").read_text(), context={"recorded": True})
    return spec, read_candidates(out / CANDIDATES_FILE)


def export(out_dir: str | os.PathLike, candidate_id: int, model_dir: str | os.PathLike, *, overwrite: bool = False,
           progress: bool = False, device: str | None = None) -> Path:
    """Writes candidate `candidate_id` of a run as a HF model folder through the streaming engine."""
    spec, cands = load_run(out_dir)
    check_inputs_unchanged(Path(out_dir), spec)
    by_id = {c.id: c for c in cands}
    if candidate_id not in by_id:
        raise ValueError(f"candidate {candidate_id} is not in {out_dir} (ids 0..{len(cands) - 1})")
    c = by_id[candidate_id]
    space = search_space(spec)
    merge_spec = MergeSpec(base=spec.base, models=spec.models, method=spec.method, params=spec.params,
                           output=spec.output, device=device or spec.device, tokenizer=spec.tokenizer)
    return merge(merge_spec, model_dir, overwrite=overwrite, progress=progress,
                 params=space.params_for_tensor(np.array(c.genome)),
                 card_extra={"candidate": c.id, "candidate_params": c.params, "objectives": c.objectives,
                             "true_objectives": c.true_objectives})


def export_mergekit(out_dir: str | os.PathLike, candidate_id: int) -> dict[str, Any]:
    """Candidate `candidate_id` of a run as a mergekit config that reproduces it (merging/mergekit.py)."""
    from merging.mergekit import base_layout, to_mergekit

    spec, cands = load_run(out_dir)
    by_id = {c.id: c for c in cands}
    if candidate_id not in by_id:
        raise ValueError(f"candidate {candidate_id} is not in {out_dir} (ids 0..{len(cands) - 1})")
    names, _, floating = base_layout(spec.base)
    merge_spec = MergeSpec(base=spec.base, models=spec.models, method=spec.method, params=spec.params,
                           output=spec.output)
    params = search_space(spec).params_for_tensor(np.array(by_id[candidate_id].genome))
    return to_mergekit(merge_spec, params, names, floating)

