"""The CAT's prior: the endpoints', the population's or the search surrogate's, at 10 and 20 items.

One Fitness is built as an evolve job builds it (endpoints, probe merges, IRT fit; p-IRT on
adaptive items, the product's default), with one resident model. A sequence of candidates
(`--sequence random`: uniform genomes; `bo`: the genomes a bo search of the same job proposes,
which crowd near the front, as a search's do) is scored by several arms, each its own
`Fitness` on the same fits and its own evaluator (so each prior learns only from its own
estimates, as in a job):
- endpoints at 10 and at 20 items (today's default prior);
- population at 10 items (the abilities of the candidates scored before);
- surrogate at 10 items (evolve/surrogate.py: a GP over genomes on the probes' and earlier
  candidates' abilities predicts this candidate's; `--min-sds` its sd floors).
Every candidate is also evaluated on every item (the truth). Printed: mean absolute error in
accuracy points over candidates x tasks per arm, overall and after the first `--skip`.

    .venv/bin/python bench/surrogate_prior.py --preset small [--method ties] [--candidates 40]
        [--sequence random,bo] [--min-sds 0.2,0.5]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, evolve_spec, load_zoo, search_args, set_threads, table  # noqa: E402


def arms(min_sds: list[float]) -> list[tuple[str, int, dict]]:
    out = [("endpoints", 20, {}), ("endpoints", 10, {}), ("population", 10, {"prior": "population"})]
    out += [(f"surrogate (min_sd {m})", 10, {"prior": "surrogate", "min_sd": m}) for m in min_sds]
    return out


def main() -> None:
    ap = search_args(__doc__)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--sequence", default="random,bo")
    ap.add_argument("--min-sds", default="0.2,0.5")
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, default=11)
    args = ap.parse_args()
    set_threads()
    from evolve.problem import CandidateEvaluator, MergeProblem
    from evolve.run import setup
    from evolve.search import run_search
    from evolve.spec import EvolveSpec
    from fitness.fitness import Fitness
    from fitness.spec import ObjectiveSpec

    zoo, manifest = load_zoo(args.preset)
    tasks = args.tasks.split(",")
    spec = evolve_spec(zoo, manifest, tasks, method=args.method, probes=args.probes)
    spec["objectives"] = [{"benchmark": o["benchmark"], "name": o["name"]} for o in spec["objectives"]]
    job = setup(EvolveSpec.model_validate(spec))
    base = job.fitness
    probe_genomes = job.probes[0]
    lo, hi = job.space.bounds
    truth: dict[tuple, dict] = {}
    results = []
    for sequence in args.sequence.split(","):
        if sequence == "random":
            X = np.random.default_rng(args.seed).uniform(lo, hi, size=(args.candidates, job.space.n_var))
        else:  # the genomes a bo search with the default fitness proposes
            ev = CandidateEvaluator(job.space, job.resident, base, probe_genomes=probe_genomes)
            res = run_search(MergeProblem(job.space, base.objectives), ev, OUT / "surrogate_prior" / "bo",
                             algorithm="bo", population=args.candidates, generations=1, seed=args.seed,
                             initial=job.probes)
            X = np.array([c.genome for c in res.candidates])
        for name, size, extra in arms([float(m) for m in args.min_sds.split(",")]):
            specs = [ObjectiveSpec.model_validate({**s.model_dump(mode="json"), "subset": {
                "strategy": "adaptive", "size": size, **extra}}) for s in base.specs]
            fitness = Fitness(specs, base.fits, base.tokenizer, base.evaluation, base.device)
            ev = CandidateEvaluator(job.space, job.resident, fitness, probe_genomes=probe_genomes)
            err = []
            for x in X:
                c = ev.candidate(x)
                key = tuple(np.round(x, 12))
                if key not in truth:
                    truth[key] = ev.true_objectives([c])[0]
                err.append([abs(c.objectives[o.name] - truth[key][o.name]) * 100 for o in fitness.objectives])
            err = np.array(err)
            results.append([sequence, name, size, float(err.mean()), float(err[args.skip:].mean())])
            print(f"{sequence:>6} {name:>24} {size:>3} items: {err.mean():.2f} points "
                  f"(after {args.skip}: {err[args.skip:].mean():.2f})", file=sys.stderr, flush=True)
    print(f"\nzoo {args.preset}, tasks {args.tasks}, method {args.method}, {args.candidates} candidates per sequence, "
          f"p-IRT on adaptive items, IRT on {len(tasks) + 1} endpoints + {args.probes} probes; |estimate - full| "
          f"in accuracy points, mean over candidates x tasks")
    print(table(["sequence", "prior", "items", "error", f"error after {args.skip}"], results))


if __name__ == "__main__":
    main()
