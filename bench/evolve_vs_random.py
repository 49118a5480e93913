"""NSGA-II against random search with the same evaluations, seed and fitness.

On the tiny zoo (tasks rev, cip, srt; one accuracy objective per task, maximized), one
Fitness is built exactly as an evolve job builds it (endpoints, P probe merges, IRT fit,
gmp_irt on 20-item entropy subsets by default; see bench/_evolve_common.py `build_fitness`),
with one resident TIES model. Then, with that same Fitness and search space:
- `nsga2`: evolve's search loop (`evolve.search.run_search`, pymoo NSGA-II, population x
  generations, seed S);
- `random`: the same number of genomes as NSGA-II scored, drawn uniformly within the same
  SearchSpace bounds (numpy, seed S), each materialized and scored by the same evaluator.
  pymoo's initial sampling draws from the same seeded generator, so both methods start from
  the same first population (identical curves up to `population` evaluations) and differ
  from there on: a paired comparison.
Hypervolume (reference point: accuracy 0 on every task) of the estimated objectives of all
candidates so far is recorded after every evaluation; at the end, each method's final front
(on estimated objectives) is evaluated in full and its TRUE hypervolume is reported (as
evolve's final check does). Several seeds with --seeds.

Printed: hypervolume after every `--every` evaluations for both methods (mean over seeds),
then per method the final estimated HV, the true HV of its final front and the front size,
and the ratio nsga2 / random. The plot (HV over evaluations) goes to
bench/out/evolve_vs_random.png.

    .venv/bin/python bench/evolve_vs_random.py [--population 12] [--generations 8] [--seeds 0,1,2]
        [--estimator p_irt] [--strategy adaptive] [--size 20] [--probes 11]

Default: about 2-4 minutes on 2 shared CPU cores (torch on 1 thread; EVOMERGE_BENCH_THREADS).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, build_fitness, evolve_spec, load_zoo, search_args, set_threads, table  # noqa: E402


def hv_curve(cands, objectives) -> list[float]:
    from evolve.pareto import hypervolume, non_dominated

    ref = np.array([o.to_min(o.worst) for o in objectives])
    F = np.array([[o.to_min(c.objectives[o.name]) for o in objectives] for c in cands])
    out = []
    for i in range(1, len(F) + 1):
        front = non_dominated(F[:i])
        out.append(hypervolume(F[:i][front], ref))
    return out


def true_front_hv(cands, objectives, evaluator) -> tuple[float, int]:
    from evolve.pareto import hypervolume, non_dominated

    ref = np.array([o.to_min(o.worst) for o in objectives])
    F = np.array([[o.to_min(c.objectives[o.name]) for o in objectives] for c in cands])
    front = non_dominated(F)
    T = []
    for i in front:
        t = evaluator.true_objectives(cands[i])
        cands[i].true_objectives = t
        T.append([o.to_min(t[o.name]) for o in objectives])
    return hypervolume(np.array(T), ref), len(front)


def main() -> None:
    ap = search_args(__doc__, generations=8)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    ap.add_argument("--estimator", default="p_irt", help="default: the product default, p_irt on adaptive items")
    ap.add_argument("--strategy", default="adaptive")
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--probes", type=int, default=11)
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--every", type=int, default=0, help="print HV every N evaluations (default: population)")
    ap.add_argument("--out", type=Path, default=OUT / "evolve_vs_random")
    ap.add_argument("--plot", type=Path, default=OUT / "evolve_vs_random.png")
    args = ap.parse_args()
    set_threads()
    from evolve.problem import CandidateEvaluator, MergeProblem
    from evolve.search import run_search

    zoo, manifest = load_zoo(args.preset)
    tasks = args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    spec = evolve_spec(zoo, manifest, tasks, method=args.method, estimator=args.estimator, strategy=args.strategy,
                       size=args.size, population=args.population, generations=args.generations,
                       probes=args.probes, epochs=args.epochs)
    print("building the fitness (endpoints, probes, IRT) ...", file=sys.stderr, flush=True)
    fitness, resident, space, setup_cost = build_fitness(spec)
    objectives = fitness.objectives
    curves = {"nsga2": [], "random": []}
    finals = {"nsga2": [], "random": []}
    for seed in seeds:
        out = args.out / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        problem = MergeProblem(space, objectives)
        ev = CandidateEvaluator(space, resident, fitness)
        res = run_search(problem, ev, out, algorithm="nsga2", population=args.population,
                         generations=args.generations, seed=seed)
        n = len(res.candidates)
        print(f"[seed {seed}] nsga2: {n} evaluations", file=sys.stderr, flush=True)
        ev_r = CandidateEvaluator(space, resident, fitness)
        rng = np.random.default_rng(seed)
        lo, hi = space.bounds
        while len(ev_r.candidates) < n:
            ev_r.candidate(rng.uniform(lo, hi))
        print(f"[seed {seed}] random: {len(ev_r.candidates)} evaluations", file=sys.stderr, flush=True)
        for name, cands, evaluator in (("nsga2", res.candidates, ev), ("random", ev_r.candidates, ev_r)):
            curves[name].append(hv_curve(cands, objectives))
            thv, nf = true_front_hv(cands, objectives, evaluator)
            finals[name].append({"seed": seed, "hv": curves[name][-1][-1], "true_hv": thv, "front": nf,
                                 "items_per_cand": float(np.mean([c.cost["items"] for c in cands]))})
        (out / "random_candidates.jsonl").write_text("".join(json.dumps(c.to_json()) + "\n" for c in ev_r.candidates))

    n = min(len(c) for cs in curves.values() for c in cs)
    mean = {k: np.mean([c[:n] for c in v], axis=0) for k, v in curves.items()}
    every = args.every or args.population
    marks = sorted(set(list(range(every, n + 1, every)) + [n]))
    print(f"\nzoo {args.preset}, tasks {','.join(tasks)}, method {args.method}; fitness {args.estimator} on "
          f"{args.size}-item {args.strategy} subsets (IRT on {len(tasks) + 1} endpoints + {args.probes} probes); "
          f"{n} evaluations per method, seeds {args.seeds}\n")
    print("hypervolume of the estimated objectives over evaluations (mean over seeds)")
    print(table(["evaluations", "nsga2 HV", "random HV", "nsga2 / random"],
                [[m, float(mean["nsga2"][m - 1]), float(mean["random"][m - 1]),
                  float(mean["nsga2"][m - 1] / mean["random"][m - 1]) if mean["random"][m - 1] else None]
                 for m in marks]))
    print("\nfinal fronts (true HV: front members re-evaluated in full)")
    rows = []
    for name in ("nsga2", "random"):
        f = finals[name]
        rows.append([name, n, float(np.mean([x["items_per_cand"] for x in f])), float(np.mean([x["hv"] for x in f])),
                     float(np.mean([x["true_hv"] for x in f])), float(np.mean([x["front"] for x in f]))])
    thv_n, thv_r = rows[0][4], rows[1][4]
    print(table(["method", "evaluations", "items/cand", "est HV", "true HV", "front size"], rows))
    print(f"\ntrue HV nsga2 / random: {thv_n / thv_r:.3f}" if thv_r else "\nrandom's true HV is 0")
    for s, a, b in zip(seeds, finals["nsga2"], finals["random"]):
        print(f"  seed {s}: nsga2 true HV {a['true_hv']:.4f}, random true HV {b['true_hv']:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    x = np.arange(1, n + 1)
    for name, color in (("nsga2", "#d62728"), ("random", "#1f77b4")):
        for c in curves[name]:
            ax.plot(x, c[:n], color=color, alpha=0.25, lw=1)
        ax.plot(x, mean[name], color=color, lw=2, label=f"{name} (mean of {len(seeds)})")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (estimated objectives)")
    ax.set_title(f"NSGA-II vs random search, {','.join(tasks)}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
