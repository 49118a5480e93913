"""Bayesian optimization and NSGA-II against random search, same budget, seed and fitness.

For each merge method (`--methods`, default ties and task_arithmetic) one Fitness is built
exactly as an evolve job builds it (endpoints, probe merges at Latin-hypercube points, IRT
fit; fitness: p-IRT on 20 adaptive items per task, the setting the default `estimator: auto`
keeps on the zoo, bench/fitness_auto.py), with one
resident model. Then, per search seed, with that Fitness and search space, three searches of
`--budget` candidates each:
- `bo`: evolve's search loop with `algorithm: bo` (evolve/bo.py; the job's probes, scored in
  full for the IRT fit, are its free initial data, as in a job);
- `nsga2`: the same loop with NSGA-II, population `--population`, budget / population generations;
- `random`: genomes drawn uniformly within the same bounds (numpy, seed S), scored by the same evaluator.
All three run one candidate after another, and none depends on the budget, so the first k
candidates of a run are the run a budget of k would have made: each `--checkpoints` value
(default 48 and the budget) is read off the same runs. At each checkpoint, the front of the
candidates so far (on estimated objectives) is evaluated in full (each genome once, cached)
and its TRUE hypervolume is reported (reference point: accuracy 0 on every task), with that of
the true front of every genome the seed evaluated in full (all algorithms, all checkpoints): a
reference for what the run's evaluations reach at all.

Printed: mean true HV per algorithm and checkpoint with the ratios the issue asks for
(bo / random and bo / nsga2 at the budget, bo at 48 / random at the budget), per-seed values,
bo's own seconds per suggestion against a candidate's merge + score seconds, and a plot of
the estimated hypervolume over evaluations (bench/out/evolve_vs_random.png). Each (method,
seed) is saved to bench/out/evolve_vs_random/<method>/seed<S>.json as it finishes, and is
reused by a later run (`--fresh` recomputes), so a long run can be continued and the table
printed from what is there (`--report`).

    .venv/bin/python bench/evolve_vs_random.py --preset small [--methods ties,task_arithmetic]
        [--seeds 0,1,2,3,4,5] [--budget 96] [--checkpoints 48,96] [--granularity per_block --blocks 4]

About 15 minutes per (method, seed) on the small zoo, most of it the full evaluations of the
fronts (shared 2-core CPU machine, torch on 1 thread; EVOMERGE_BENCH_THREADS).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, evolve_spec, load_zoo, search_args, set_threads, table  # noqa: E402

ALGORITHMS = ("bo", "nsga2", "random")


def hv_curve(F: np.ndarray, ref: np.ndarray) -> list[float]:
    """Hypervolume of the first i candidates' front, for every i."""
    from evolve.pareto import hypervolume, non_dominated

    return [hypervolume(F[:i][non_dominated(F[:i])], ref) for i in range(1, len(F) + 1)]


def run_seed(job, seed: int, args, out: Path) -> dict:
    """The three searches of one seed, their checkpoints' fronts evaluated in full."""
    from evolve.pareto import hypervolume, non_dominated
    from evolve.problem import CandidateEvaluator, MergeProblem, minimized
    from evolve.search import run_search

    objectives = job.fitness.objectives
    ref = np.array([o.to_min(o.worst) for o in objectives])
    runs = {}
    for algo in args.algorithms:
        ev = CandidateEvaluator(job.space, job.resident, job.fitness)
        t0 = time.perf_counter()
        overhead = {}
        if algo == "random":
            rng = np.random.default_rng(seed)
            lo, hi = job.space.bounds
            while len(ev.candidates) < args.budget:
                ev.candidate(rng.uniform(lo, hi))
            cands = ev.candidates
        else:
            shutil.rmtree(out / algo, ignore_errors=True)
            res = run_search(MergeProblem(job.space, objectives), ev, out / algo, algorithm=algo,
                             population=args.population, generations=args.budget // args.population, seed=seed,
                             initial=job.probes if algo == "bo" else None)
            cands, overhead = res.candidates[:args.budget], res.overhead
        seconds = time.perf_counter() - t0
        print(f"[seed {seed}] {algo}: {len(cands)} candidates in {seconds:.0f} s", file=sys.stderr, flush=True)
        runs[algo] = (cands, ev, overhead, seconds)

    result = {"seed": seed, "algorithms": {}}
    truth: dict[str, dict] = {}
    for algo, (cands, ev, overhead, seconds) in runs.items():
        F = minimized([c.objectives for c in cands], objectives)
        per = {"curve": hv_curve(F, ref), "overhead": overhead, "search_seconds": seconds,
               "candidate_seconds": float(np.mean([c.cost["merge_seconds"] + c.cost["score_seconds"] for c in cands])),
               "checkpoints": {}}
        for k in args.checkpoints:
            front = non_dominated(F[:k])
            todo = list({cands[i].key: cands[i] for i in front if cands[i].key not in truth}.values())
            truth.update(zip([c.key for c in todo], ev.true_objectives(todo)))
            T = [[o.to_min(truth[cands[i].key][o.name]) for o in objectives] for i in front]
            per["checkpoints"][str(k)] = {"true_hv": hypervolume(np.array(T), ref), "est_hv": per["curve"][k - 1],
                                          "front": len(front)}
        result["algorithms"][algo] = per
        print(f"[seed {seed}] {algo}: " + ", ".join(f"{k}: true HV {v['true_hv']:.4f}" for k, v in
                                                   per["checkpoints"].items()), file=sys.stderr, flush=True)
    T = np.array([[o.to_min(v[o.name]) for o in objectives] for v in truth.values()])
    result["union_hv"] = hypervolume(T[non_dominated(T)], ref)  # every fully evaluated genome of the seed
    result["full_evaluations"] = len(truth)
    result["truth"] = truth
    return result


def report(results: dict[str, list[dict]], args) -> None:
    budget, first = str(args.budget), str(min(args.checkpoints))
    for method, seeds in results.items():
        if not seeds:
            continue
        algos = [a for a in ALGORITHMS if all(a in r["algorithms"] for r in seeds)]
        print(f"\n{method}: {len(seeds)} seeds ({', '.join(str(r['seed']) for r in seeds)}); true HV of the front "
              f"after k candidates (mean over seeds, sd in brackets)")
        rows = []
        for a in algos:
            row = [a]
            for k in map(str, args.checkpoints):
                v = [r["algorithms"][a]["checkpoints"][k]["true_hv"] for r in seeds]
                row.append(f"{np.mean(v):.4f} ({np.std(v):.4f})")
            row.append(float(np.mean([r["algorithms"][a]["checkpoints"][budget]["front"] for r in seeds])))
            rows.append(row)
        print(table(["algorithm", *[f"k={k}" for k in args.checkpoints], f"front at {budget}"], rows))

        def mean(a, k):
            return float(np.mean([r["algorithms"][a]["checkpoints"][k]["true_hv"] for r in seeds]))

        def per_seed(a, b, ka, kb):
            hv = lambda r, x, k: r["algorithms"][x]["checkpoints"][k]["true_hv"]  # noqa: E731
            return " / ".join(f"{hv(r, a, ka) / hv(r, b, kb):.2f}" for r in seeds)
        if {"bo", "random"} <= set(algos):
            print(f"bo / random at {budget}: {mean('bo', budget) / mean('random', budget):.3f} (target >= 1.10; "
                  f"per seed {per_seed('bo', 'random', budget, budget)})")
            print(f"bo at {first} / random at {budget}: {mean('bo', first) / mean('random', budget):.3f} "
                  f"(target >= 1.00; per seed {per_seed('bo', 'random', first, budget)})")
        if {"bo", "nsga2"} <= set(algos):
            print(f"bo / nsga2 at {budget}: {mean('bo', budget) / mean('nsga2', budget):.3f} (target >= 1.15; "
                  f"per seed {per_seed('bo', 'nsga2', budget, budget)})")
        union = [r["union_hv"] for r in seeds if "union_hv" in r]
        if union:
            print(f"every fully evaluated genome of a seed, its true front: HV {np.mean(union):.4f} (an attainable "
                  f"reference; random at {budget} reaches {mean('random', budget) / np.mean(union):.3f} of it)"
                  if "random" in algos and len(union) == len(seeds) else f"union HV {np.mean(union):.4f}")
        if "bo" in algos:
            ov = [r["algorithms"]["bo"]["overhead"] for r in seeds]
            cand = np.mean([r["algorithms"]["bo"]["candidate_seconds"] for r in seeds])
            sps = np.mean([o["seconds_per_suggestion"] for o in ov])
            print(f"bo's own time per suggestion: {sps:.2f} s mean, {max(o['max_seconds_per_ask'] for o in ov):.2f} s "
                  f"max; a candidate's merge + score: {cand:.2f} s here")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, s in results.items() if s]
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), dpi=100, squeeze=False)
    colors = {"bo": "#2ca02c", "nsga2": "#d62728", "random": "#1f77b4"}
    for ax, method in zip(axes[0], methods):
        for a in ALGORITHMS:
            curves = [r["algorithms"][a]["curve"] for r in results[method] if a in r["algorithms"]]
            if not curves:
                continue
            n = min(map(len, curves))
            x = np.arange(1, n + 1)
            for c in curves:
                ax.plot(x, c[:n], color=colors[a], alpha=0.2, lw=1)
            ax.plot(x, np.mean([c[:n] for c in curves], 0), color=colors[a], lw=2, label=f"{a} (mean of {len(curves)})")
            for r in results[method]:
                for k, v in r["algorithms"].get(a, {}).get("checkpoints", {}).items():
                    ax.scatter([int(k)], [v["true_hv"]], color=colors[a], marker="x", s=25)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("hypervolume (lines: estimated; x: true, front checked in full)")
        ax.set_title(method)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"\nplot: {path}")


def main() -> None:
    ap = search_args(__doc__, generations=8)
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--checkpoints", default="48,96")
    ap.add_argument("--granularity", default="global")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--probes", type=int, default=11)
    ap.add_argument("--fresh", action="store_true", help="recompute seeds already saved")
    ap.add_argument("--report", action="store_true", help="only print the table from the saved seeds")
    ap.add_argument("--out", type=Path, default=OUT / "evolve_vs_random")
    args = ap.parse_args()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.checkpoints = sorted({int(k) for k in args.checkpoints.split(",")} | {args.budget})
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = "" if args.granularity == "global" else f"-{args.granularity}{args.blocks}"
    set_threads()
    results: dict[str, list[dict]] = {}
    for method in args.methods.split(","):
        folder = args.out / f"{method}{tag}"
        results[method + tag] = []
        job = None
        for seed in seeds:
            saved = folder / f"seed{seed}.json"
            if saved.is_file() and not args.fresh:
                results[method + tag].append(json.loads(saved.read_text()))
                continue
            if args.report:
                continue
            if job is None:
                from evolve.run import setup
                from evolve.spec import EvolveSpec

                zoo, manifest = load_zoo(args.preset)
                spec = evolve_spec(zoo, manifest, args.tasks.split(","), method=method, estimator="p_irt",
                                   strategy="adaptive", size=20, probes=args.probes)
                spec["search"].update(granularity=args.granularity, blocks=args.blocks)
                spec["objectives"] = [{"benchmark": o["benchmark"], "name": o["name"]} for o in spec["objectives"]]
                print(f"{method}: building the fitness (endpoints, probes, IRT) ...", file=sys.stderr, flush=True)
                job = setup(EvolveSpec.model_validate(spec))
            r = run_seed(job, seed, args, folder / f"seed{seed}")
            folder.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(r))
            results[method + tag].append(r)
    print(f"\nzoo {args.preset}, tasks {args.tasks}, fitness: p_irt on 20 adaptive items per task, "
          f"{args.probes} probes; budget {args.budget}, granularity {args.granularity}"
          + (f" ({args.blocks} blocks)" if tag else ""))
    report(results, args)
    plot(results, OUT / f"evolve_vs_random{tag}.png")


if __name__ == "__main__":
    main()
