"""How well do cheap fitness estimates track full evaluation? (MERGE^3 / tinyBenchmarks / Evo-L2S)

On a zoo (default `tiny`; `--preset small` for the issue's setting):
1. the endpoint models (base and full fine-tunes) and P probe merges (task arithmetic,
   as an evolve job builds them) are evaluated on every benchmark in full: they are what
   IRT is fitted on and what the entropy subset is chosen from;
2. H held-out merges (random method among task_arithmetic / ties / dare_ties / tsv, random
   weights and densities) are evaluated in full: their exact accuracies are the truth;
3. for every benchmark, strategy (random, anchor, entropy) and k, each estimator predicts
   every held-out merge's accuracy from its answers on the k subset items only (batched
   evaluation does not depend on batch mates, so a subset's answers are a slice of the full
   answers). Random subsets are redrawn per seed and averaged.

Printed: mean absolute error in accuracy points against full evaluation, Spearman rank
correlation across the held-out merges, and the cost ratio: full-benchmark items per
candidate divided by items per candidate, with and without the one-off cost of the
endpoint and probe evaluations amortized over the held-out merges.

    .venv/bin/python bench/fitness_estimators.py [--preset tiny] [--merges 30] [--ks 10,20,50,100]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evolve.materialize import ResidentMerge  # noqa: E402
from evolve.run import probe_weights  # noqa: E402
from fitness.benchmarks import load_benchmark  # noqa: E402
from fitness.estimators import estimate  # noqa: E402
from fitness.evaluate import EvalSettings, evaluate, evaluate_folder  # noqa: E402
from fitness.irt import estimate_theta, fit_item_params  # noqa: E402
from fitness.subsets import anchor_subset, entropy_subset, random_subset  # noqa: E402
from merging.spec import method_params  # noqa: E402

ESTIMATORS = ["subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt"]
STRATEGIES = ["random", "anchor", "entropy"]
HELD_OUT_METHODS = ["task_arithmetic", "ties", "dare_ties", "tsv"]


def held_out_params(method: str, n: int, rng: np.random.Generator) -> dict:
    p = {"weights": rng.uniform(0.2, 1.0, n).round(3).tolist()}
    if method in ("ties", "dare_ties"):
        p["density"] = round(float(rng.uniform(0.2, 0.9)), 3)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--zoo", type=Path, help="zoo folder (default: .cache/zoo-<preset>-seed0)")
    ap.add_argument("--merges", type=int, default=30)
    ap.add_argument("--probes", type=int, default=11)
    ap.add_argument("--ks", default="10,20,50,100")
    ap.add_argument("--seeds", type=int, default=5, help="random-subset redraws")
    ap.add_argument("--epochs", type=int, default=600, help="py-irt epochs")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from zoo.build import build_zoo

    zoo = args.zoo or ROOT / ".cache" / f"zoo-{args.preset}-seed0"
    manifest = build_zoo(zoo, preset=args.preset, seed=0, log=lambda m: print(m, file=sys.stderr))
    tasks = list(manifest["benchmarks"])
    base = zoo / manifest["models"]["base"]["path"]
    fts = [zoo / manifest["models"][t]["path"] for t in tasks]
    benches = {t: load_benchmark(zoo / manifest["benchmarks"][t]["path"]) for t in tasks}
    settings = EvalSettings(**{k: v for k, v in manifest["eval_settings"].items()})
    tok = AutoTokenizer.from_pretrained(base)
    t0 = time.perf_counter()

    def full(model) -> dict[str, np.ndarray]:
        return {t: evaluate(model, tok, b, settings, device="cpu").correct for t, b in benches.items()}

    endpoints = {t: [] for t in tasks}
    for folder in [base, *fts]:
        for t, b in benches.items():
            endpoints[t].append(evaluate_folder(folder, b, settings, device="cpu").correct)
    resident = ResidentMerge(base, fts, "task_arithmetic", device="cpu")
    probes = {t: [] for t in tasks}
    for w in probe_weights(args.probes, len(fts), seed=42):
        for t, y in full(resident.materialize(method_params("task_arithmetic", {"weights": w}, len(fts)))).items():
            probes[t].append(y)
    t_setup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    truth = {t: [] for t in tasks}
    for h in range(args.merges):
        method = HELD_OUT_METHODS[h % len(HELD_OUT_METHODS)]
        r = resident if method == "task_arithmetic" else ResidentMerge(base, fts, method, device="cpu")
        for t, y in full(r.materialize(method_params(method, held_out_params(method, len(fts), rng), len(fts)))).items():
            truth[t].append(y)
    t_truth = time.perf_counter() - t0 - t_setup
    per_candidate_full = t_truth / args.merges

    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for t in tasks:
        Y = np.array(endpoints[t] + probes[t], dtype=float)
        params = fit_item_params(Y, "2pl", epochs=args.epochs, seed=42)
        thetas = estimate_theta(Y[: len(endpoints[t])], params)
        T = np.array(truth[t], dtype=float)
        exact = T.mean(1)
        for strategy in STRATEGIES:
            for k in ks:
                if k >= T.shape[1]:
                    continue
                draws = range(args.seeds) if strategy == "random" else [0]
                for est in ESTIMATORS:
                    maes, rhos = [], []
                    for seed in draws:
                        if strategy == "random":
                            sub = random_subset(T.shape[1], k, seed=seed)
                        elif strategy == "anchor":
                            sub = anchor_subset(k, item_params=params, responses=Y, seed=42)
                        else:
                            sub = entropy_subset(Y, k, seed=seed)
                        pred = np.asarray(estimate(est, T[:, sub.indices], sub.indices, sub.weights, params, thetas))
                        maes.append(np.abs(pred - exact).mean() * 100)
                        rhos.append(spearmanr(pred, exact).statistic if exact.std() > 0 else np.nan)
                    rows.append({"task": t, "strategy": strategy, "k": k, "estimator": est,
                                 "mae": float(np.mean(maes)), "spearman": float(np.nanmean(rhos)),
                                 "items_full": T.shape[1]})
    # table: averaged over tasks
    print(f"\nzoo {args.preset}: {len(tasks)} benchmarks, {args.merges} held-out merges, IRT on "
          f"{len(fts) + 1} endpoints + {args.probes} probes; full evaluation {per_candidate_full:.2f}s per merge\n")
    n_full = np.mean([len(b) for b in benches.values()])
    setup_items = (len(fts) + 1 + args.probes) * n_full
    print(f"{'strategy':9} {'k':>4} {'estimator':12} {'MAE (pts)':>9} {'Spearman':>8} {'items x':>8} {'x w/ setup':>10}")
    for strategy in STRATEGIES:
        for k in ks:
            for est in ESTIMATORS:
                sel = [r for r in rows if r["strategy"] == strategy and r["k"] == k and r["estimator"] == est]
                if not sel:
                    continue
                mae = np.mean([r["mae"] for r in sel])
                rho = np.nanmean([r["spearman"] for r in sel])
                ratio = n_full / k
                amortized = (n_full * args.merges) / (k * args.merges + setup_items)
                print(f"{strategy:9} {k:>4} {est:12} {mae:9.2f} {rho:8.3f} {ratio:8.1f} {amortized:10.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
