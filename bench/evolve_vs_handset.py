"""The best evolved merge against hand-set merges, on TRUE average normalized accuracy.

On the tiny zoo (tasks rev, cip, srt), an evolve job (`evolve.run`: TIES over weights in
[0, 1.5] and densities in [0.1, 1], NSGA-II, gmp_irt on 20-item entropy subsets, one accuracy
objective per task) ends with its final check, which evaluates every front member in full.
The best evolved merge is the front member with the highest TRUE average accuracy.

Peers, merging the same fine-tunes, each evaluated in full on the same benchmarks with
the same evaluation settings (one `ResidentMerge` per method, `fitness.evaluate.evaluate`):
- task arithmetic, weights 1, lambda in 0.2, 0.4, 0.6, 0.8, 1.0;
- TIES, density 0.2, lambda 1 (weights 1);
- TSV-M, alpha 1 (weights 1);
- for context, each fine-tune alone (accuracies from the zoo's manifest).
Normalized accuracy per task = merged accuracy / the task's own fine-tune's accuracy; the
score is its mean over the tasks. Printed: per-task accuracy, average accuracy, average
normalized accuracy, and the gap of the best evolved merge to the best hand-set merge.

    .venv/bin/python bench/evolve_vs_handset.py [--tasks rev,cip,srt] [--population 12] [--generations 6]
        [--method ties|task_arithmetic|...] [--estimator p_irt|gmp_irt|full] [--strategy adaptive|random|anchor|entropy]

Default: about 2-4 minutes on 2 shared CPU cores (torch on 1 thread; EVOMERGE_BENCH_THREADS).
Run folder: bench/out/evolve_vs_handset/.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from core.hooks import Hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, StageClock, evolve_spec, load_zoo, search_args, set_threads, table  # noqa: E402

HANDSET = ([("task_arithmetic", {"lambda": lam}, f"task_arithmetic lambda={lam:.1f}")
            for lam in (0.2, 0.4, 0.6, 0.8, 1.0)]
           + [("ties", {"density": 0.2, "lambda": 1.0}, "ties density=0.2 lambda=1"),
              ("tsv", {"alpha": 1.0}, "tsv alpha=1")])


def main() -> None:
    ap = search_args(__doc__, generations=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--estimator", default="p_irt", help="default: the product default, p_irt on adaptive items")
    ap.add_argument("--strategy", default="adaptive")
    ap.add_argument("--size", type=int, default=20)
    ap.add_argument("--probes", type=int, default=11)
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--out", type=Path, default=OUT / "evolve_vs_handset")
    args = ap.parse_args()
    set_threads()
    from transformers import AutoTokenizer

    from data.benchmarks import load_benchmark
    from evolve.materialize import ResidentMerge
    from evolve.run import run
    from fitness.evaluate import evaluate
    from fitness.fitness import eval_settings
    from fitness.spec import EvaluationSpec
    from merging.methods import method_params

    zoo, manifest = load_zoo(args.preset)
    tasks = args.tasks.split(",")
    space = {"weights": [0.0, 1.5], "density": [0.1, 1.0]} if args.method == "ties" else None
    spec = evolve_spec(zoo, manifest, tasks, method=args.method, space=space, estimator=args.estimator,
                       strategy=args.strategy, size=args.size, population=args.population,
                       generations=args.generations, seed=args.seed, probes=args.probes, epochs=args.epochs)
    shutil.rmtree(args.out, ignore_errors=True)
    clock = StageClock()
    res = run(spec, args.out, hooks=Hooks(clock))
    print(f"evolve: {res.cost['candidates']} candidates, front {len(res.front)}, stages "
          + ", ".join(f"{k} {v:.0f}s" for k, v in clock.seconds().items()), file=sys.stderr, flush=True)
    own = {t: manifest["accuracy"][t][t] for t in tasks}

    def row(label, accs):
        norm = [accs[t] / own[t] for t in tasks]
        return [label, *[accs[t] for t in tasks], float(np.mean([accs[t] for t in tasks])), float(np.mean(norm))]

    rows = []
    best = max(res.front, key=lambda f: np.mean([f["true_objectives"][t] for t in tasks]))
    p = best["params"][0]
    desc = ", ".join(f"{k}={[round(x, 2) for x in v] if isinstance(v, list) else round(v, 2)}" for k, v in p.items())
    evolved = row(f"evolved #{best['id']} ({args.method} {desc})", best["true_objectives"])
    knee = next(f for f in res.front if f["knee"])
    knee_row = row(f"evolved knee #{knee['id']}", knee["true_objectives"])

    base = zoo / manifest["models"]["base"]["path"]
    fts = [zoo / manifest["models"][t]["path"] for t in tasks]
    tok = AutoTokenizer.from_pretrained(base)
    settings = eval_settings(EvaluationSpec(max_new_tokens=manifest["eval_settings"]["max_new_tokens"]), "cpu")
    benches = {t: load_benchmark(zoo / manifest["benchmarks"][t]["path"]) for t in tasks}
    hand = []
    residents = {}
    for method, params, label in HANDSET:
        rm = residents.setdefault(method, ResidentMerge(base, fts, method, device="cpu"))
        model = rm.materialize(method_params(method, params, len(fts)))
        accs = {t: evaluate(model, tok, b, settings, batch_size=64, device="cpu").accuracy for t, b in benches.items()}
        hand.append(row(label, accs))
        print(f"{label}: " + ", ".join(f"{t} {a:.3f}" for t, a in accs.items()), file=sys.stderr, flush=True)
    singles = [row(f"fine-tune {m} alone", {t: manifest["accuracy"][m][t] for t in tasks}) for m in tasks]
    rows = [evolved, knee_row, *hand, *singles]

    print(f"\nzoo {args.preset}, tasks {','.join(tasks)}; evolve: {args.method}, NSGA-II {args.population} x "
          f"{args.generations}, seed {args.seed}, fitness "
          + ("full (every item)" if args.estimator == "full" else f"{args.estimator} on {args.size}-item {args.strategy} subsets")
          + "; "
          f"all accuracies below are TRUE (full benchmarks, {len(benches[tasks[0]])} items each)\n"
          f"own fine-tune accuracy: " + ", ".join(f"{t} {own[t]:.3f}" for t in tasks) + "\n")
    print(table(["merge", *[f"{t} acc" for t in tasks], "avg acc", "avg norm acc"], rows))
    best_hand = max(hand, key=lambda r: r[-1])
    print(f"\nbest evolved avg normalized accuracy {evolved[-1]:.3f} vs best hand-set ({best_hand[0]}) "
          f"{best_hand[-1]:.3f}: {evolved[-1] - best_hand[-1]:+.3f} ({evolved[-1] / best_hand[-1]:.2f}x)")


if __name__ == "__main__":
    main()
