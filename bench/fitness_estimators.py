"""How well do cheap fitness estimates track full evaluation? (MERGE^3 / tinyBenchmarks / Evo-L2S)

On a zoo (default `tiny`; `--preset small` for the issue's setting):
1. the endpoint models (base and full fine-tunes) and P probe merges are evaluated on every
   benchmark in full: they are what IRT is fitted on and what the entropy subset is chosen
   from. Probes are random merges drawn like the held-out ones (another seed), as an evolve
   job draws its probes from its own search space;
2. H held-out merges (random method among task_arithmetic / ties / dare_ties / tsv, random
   weights and densities) are evaluated in full: their exact accuracies are the truth. Probe
   and held-out answers go to the per-machine response cache under their recipe (as evolve
   caches its probes), so a rerun with other options evaluates only what it has not seen;
3. for every benchmark, strategy (random, anchor, entropy; stratified by item kind as an
   evolve job draws them, random also by difficulty; `random_kind`: by kind only) and k, each estimator predicts
   every held-out merge's accuracy from its answers on the k subset items only (batched
   evaluation does not depend on batch mates, so a subset's answers are a slice of the full
   answers). Random subsets are redrawn per seed and averaged.
4. adaptive item selection (`fitness.adaptive`, computerized adaptive testing) with a budget of
   k items per benchmark, rounds of `--round` items, the endpoint prior (`adaptive`) or the
   population prior (`adaptive_pop`: the held-out merges scored in order, each one's prior from
   the abilities of those before it), stopping early at `--stop-sd`; its answers too are slices
   of the full answers, chosen round by round.

Estimator columns mean the same function of the items seen in every row: `p_irt` etc. as in
fitness.estimators (MLE theta), and `map` = p-IRT with the MAP theta under the strategy's prior
(the endpoint prior for fixed subsets): for the adaptive rows that is the CAT's own prediction
and what an evolve job with `estimator: p_irt, subset: {strategy: adaptive}` reports.

Printed: mean absolute error in accuracy points against full evaluation, Spearman rank
correlation across the held-out merges (averaged over benchmarks), items and forward passes
per candidate (all benchmarks; fixed subsets as `Fitness.score` runs them, every benchmark's
items in one evaluation; adaptive rounds likewise with every benchmark's next items), the wall time
per candidate of really running those evaluations (and the CAT's arithmetic) on the first
`--timed` held-out merges (their full evaluation is timed the same way, for the baseline), and the cost ratio: full-benchmark items per candidate divided by
items per candidate, with and without the one-off cost of the endpoint and probe evaluations
amortized over the held-out merges.

    .venv/bin/python bench/fitness_estimators.py [--preset tiny] [--merges 30] [--ks 10,20,50,100]
        [--round 5] [--stop-sd 0] [--timed 6]

An existing zoo folder (zoo.json present) is used as it is, without rebuilding it.
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

from core.hashing import content_hash  # noqa: E402
from data.benchmarks import load_benchmark  # noqa: E402
from evolve.materialize import ResidentMerge  # noqa: E402
from evolve.run import recipe_digest  # noqa: E402
from fitness.adaptive import (  # noqa: E402
    DEFAULT_MIN_SD,
    CatSession,
    PopulationPrior,
    answers_prior,
    fixed_map_accuracy,
)
from fitness.estimators import estimate  # noqa: E402
from fitness.evaluate import EvalSettings, cached_responses, evaluate, evaluate_folder  # noqa: E402
from fitness.irt import estimate_theta, fit_item_params  # noqa: E402
from fitness.subsets import anchor_subset, balanced_subset, difficulty_strata, entropy_subset, random_subset  # noqa: E402
from merging.methods import method_params  # noqa: E402

ESTIMATORS = ["subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt", "map"]
STRATEGIES = ["random", "balanced", "random_kind", "anchor", "entropy", "adaptive", "adaptive_pop"]
FIXED = ["random", "balanced", "random_kind", "anchor", "entropy"]
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
    ap.add_argument("--seeds", type=int, default=20, help="random-subset redraws")
    ap.add_argument("--fitter", default="map", choices=["map", "py-irt"], help="IRT fitter (fitness.irt)")
    ap.add_argument("--epochs", type=int, default=600, help="py-irt epochs")
    ap.add_argument("--round", type=int, default=5, help="adaptive: items per round per benchmark")
    ap.add_argument("--stop-sd", type=float, default=0.0, help="adaptive: early stop threshold (0: never)")
    ap.add_argument("--min-sd", type=float, default=DEFAULT_MIN_SD, help="adaptive: prior sd floor")
    ap.add_argument("--batch", type=int, default=64, help="evaluation batch size (forward-pass count)")
    ap.add_argument("--timed", type=int, default=6, help="held-out merges whose subset evaluations are timed")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--dump", type=Path, help="also write the response matrices (endpoints, probes, truth) as .npz")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from zoo.build import build_zoo

    zoo = args.zoo or ROOT / ".cache" / f"zoo-{args.preset}-seed0"
    if (zoo / "zoo.json").is_file():
        manifest = json.loads((zoo / "zoo.json").read_text())
    else:
        manifest = build_zoo(zoo, preset=args.preset, seed=0, log=lambda m: print(m, file=sys.stderr))
    tasks = [t for t in manifest["benchmarks"] if t in manifest["models"]]  # tasks with a fine-tune
    base = zoo / manifest["models"]["base"]["path"]
    fts = [zoo / manifest["models"][t]["path"] for t in tasks]
    benches = {t: load_benchmark(zoo / manifest["benchmarks"][t]["path"]) for t in tasks}
    settings = EvalSettings(**{k: v for k, v in manifest["eval_settings"].items()})
    tok = AutoTokenizer.from_pretrained(base)

    inputs = [content_hash(base), *(content_hash(f) for f in fts)]

    def full(recipe: dict, make_model) -> dict[str, np.ndarray]:
        """Answers of a merge on every item, from the response cache when this machine has them:
        the probes and held-out merges are named by recipe (as evolve names its probes)."""
        digest, model = recipe_digest(recipe, inputs), None

        def compute(b):
            nonlocal model
            model = model or make_model()
            return evaluate(model, tok, b, settings, device="cpu")

        return {t: cached_responses(digest, b, settings, "cpu", lambda b=b: compute(b)).correct
                for t, b in benches.items()}

    endpoints = {t: [] for t in tasks}
    for folder in [base, *fts]:
        for t, b in benches.items():
            endpoints[t].append(evaluate_folder(folder, b, settings, device="cpu").correct)
    residents = {"task_arithmetic": ResidentMerge(base, fts, "task_arithmetic", device="cpu")}

    def materializer(method: str, params):
        def make():
            if method not in residents:
                residents[method] = ResidentMerge(base, fts, method, device="cpu")
            return residents[method].materialize(params)
        return make

    def random_merges(role: str, n: int, seed: int) -> tuple[list[tuple], dict[str, list]]:
        """n merges of random method and parameters, evaluated in full: (method, params) and answers."""
        rng, merges, answers = np.random.default_rng(seed), [], {t: [] for t in tasks}
        for h in range(n):
            method = HELD_OUT_METHODS[h % len(HELD_OUT_METHODS)]
            raw = held_out_params(method, len(fts), rng)
            merges.append((method, method_params(method, raw, len(fts))))
            for t, y in full({role: method, "params": raw}, materializer(*merges[-1])).items():
                answers[t].append(y)
        return merges, answers

    _, probes = random_merges("probe", args.probes, seed=1)
    held_out, truth = random_merges("held_out", args.merges, seed=0)
    if args.dump:
        np.savez(args.dump, **{f"{kind}/{t}": np.array(d[t], dtype=np.uint8)
                               for kind, d in (("endpoints", endpoints), ("probes", probes), ("truth", truth))
                               for t in tasks})

    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    signed = {}  # (strategy, k, estimator) -> (exact accuracy, signed error in points) per prediction
    fits = {}
    subsets = {}  # (task, strategy, k, seed) -> fixed Subset
    cats = {}  # (task, strategy, k) -> per merge (items, answers, map accuracy, rounds by size)
    for t in tasks:
        Y = np.array(endpoints[t] + probes[t], dtype=float)
        params = fit_item_params(Y, "2pl", fitter=args.fitter, epochs=args.epochs, seed=42)
        thetas = estimate_theta(Y[: len(endpoints[t])], params)
        prior = answers_prior(params, Y[: len(endpoints[t])], args.min_sd)
        fits[t] = (params, thetas, prior)
        T = np.array(truth[t], dtype=float)
        exact = T.mean(1)
        for strategy in STRATEGIES:
            for k in ks:
                if k >= T.shape[1]:
                    continue
                draws = range(args.seeds) if strategy.startswith("random") or strategy == "balanced" else [0]
                preds = {est: [] for est in ESTIMATORS}
                for seed in draws:
                    if strategy in FIXED:
                        kinds = [it.kind for it in benches[t].items]  # strata, as fitness.Fitness draws them
                        if strategy == "random":  # as an evolve job draws it: strata by kind and difficulty
                            sub = random_subset(T.shape[1], k, seed=seed, groups=difficulty_strata(kinds, Y, k))
                        elif strategy == "balanced":  # the same strata, balanced on endpoints and probes
                            sub = balanced_subset(Y, k, seed=seed, groups=difficulty_strata(kinds, Y, k))
                        elif strategy == "random_kind":  # strata by item kind only
                            sub = random_subset(T.shape[1], k, seed=seed, groups=kinds)
                        elif strategy == "anchor":
                            sub = anchor_subset(k, item_params=params, responses=Y, seed=42, groups=kinds)
                        else:
                            sub = entropy_subset(Y, k, seed=seed, groups=kinds)
                        subsets[t, strategy, k, seed] = sub
                        seen = [sub.indices] * T.shape[0]
                        weights = sub.weights
                        maps = [fixed_map_accuracy(params, sub.indices, T[i, sub.indices], prior)
                                for i in range(T.shape[0])]
                    else:
                        pop = PopulationPrior(prior, args.min_sd) if strategy == "adaptive_pop" else None
                        runs = []
                        for i in range(T.shape[0]):
                            s = CatSession(params, pop.prior() if pop else prior, k, args.round, args.stop_sd)
                            sizes = []
                            while not s.done:
                                idx = s.next_items()
                                sizes.append(idx.size)
                                s.observe(idx, T[i, idx])
                            if pop:
                                pop.add(s.theta)
                            runs.append((np.array(s.items), s.accuracy, sizes, s.theta))
                        cats[t, strategy, k] = runs
                        seen = [r[0] for r in runs]
                        weights = None
                        maps = [r[1] for r in runs]
                    for est in ESTIMATORS:
                        if est == "map":
                            pred = np.array(maps)
                        else:
                            pred = np.array([estimate(est, T[i, seen[i]], seen[i], weights, params, thetas)
                                             for i in range(T.shape[0])])
                        preds[est].append(pred)
                for est in ESTIMATORS:
                    signed.setdefault((strategy, k, est), []).extend(
                        (e, d) for p in preds[est] for e, d in zip(exact, (p - exact) * 100))
                    maes = [np.abs(p - exact).mean() * 100 for p in preds[est]]
                    rhos = [spearmanr(p, exact).statistic if exact.std() > 0 else np.nan for p in preds[est]]
                    rows.append({"task": t, "strategy": strategy, "k": k, "estimator": est,
                                 "mae": float(np.mean(maes)), "spearman": float(np.nanmean(rhos)),
                                 "items_full": T.shape[1]})

    # items, forward passes and wall time per candidate, all benchmarks together
    cost = {}
    batch = args.batch
    for strategy in STRATEGIES:
        for k in ks:
            if any(k >= len(b) for b in benches.values()):
                continue
            if strategy in FIXED:  # one evaluation for all benchmarks, as Fitness.score runs them
                items = sum(len(subsets[t, strategy, k, 0]) for t in tasks)
                passes = -(-items // batch)
            else:
                it, ps = [], []
                for h in range(args.merges):
                    per_round = [cats[t, strategy, k][h][2] for t in tasks]
                    rounds = max(len(r) for r in per_round)
                    sizes = [sum(r[j] for r in per_round if j < len(r)) for j in range(rounds)]
                    it.append(sum(sizes))
                    ps.append(sum(-(-n // batch) for n in sizes))
                items, passes = float(np.mean(it)), float(np.mean(ps))
            cost[strategy, k] = {"items": items, "passes": passes, "seconds": []}
    # wall time: rerun the evaluations a candidate would need on the first few held-out merges
    mismatches, full_seconds = 0, []
    for h, (method, params_h) in enumerate(held_out[: args.timed]):
        model = materializer(method, params_h)()
        t1 = time.perf_counter()
        for t in tasks:  # what full evaluation costs (the truth above may have come from the cache)
            evaluate(model, tok, benches[t], settings, device="cpu", batch_size=batch)
        full_seconds.append(time.perf_counter() - t1)
        for (strategy, k), c in cost.items():
            t1 = time.perf_counter()
            if strategy in FIXED:
                subs = {t: subsets[t, strategy, k, 0] for t in tasks}
                r = evaluate(model, tok, [benches[t].items[i] for t in tasks for i in subs[t].indices], settings,
                             device="cpu", batch_size=batch)
                for (t, sub), part in zip(subs.items(), r.split([len(sub) for sub in subs.values()])):
                    y = part.correct
                    estimate("gmp_irt", y.astype(float), sub.indices, sub.weights, fits[t][0], fits[t][1])
                    mismatches += int((y != truth[t][h][sub.indices]).sum())
            else:
                sessions = {}
                for t in tasks:
                    params, _, prior = fits[t]
                    if strategy == "adaptive_pop":  # the prior this merge had in the run above
                        pop = PopulationPrior(prior, args.min_sd)
                        pop.restore([cats[t, strategy, k][j][3] for j in range(h)])
                        prior = pop.prior()
                    sessions[t] = CatSession(params, prior, k, args.round, args.stop_sd)
                while True:
                    asked = [(t, s.next_items()) for t, s in sessions.items() if not s.done]
                    if not asked:
                        break
                    r = evaluate(model, tok, [benches[t].items[i] for t, idx in asked for i in idx], settings,
                                 device="cpu", batch_size=batch)
                    for (t, idx), part in zip(asked, r.split([idx.size for _, idx in asked])):
                        sessions[t].observe(idx, part.correct)
                        mismatches += int((part.correct != truth[t][h][idx]).sum())
                for s in sessions.values():
                    s.accuracy  # noqa: B018  (the prediction is part of the cost)
            c["seconds"].append(time.perf_counter() - t1)
    per_candidate_full = float(np.mean(full_seconds)) if full_seconds else float("nan")
    # table: averaged over tasks
    print(f"\nzoo {manifest['preset']}: {len(tasks)} benchmarks, {args.merges} held-out merges, IRT ({args.fitter}) on "
          f"{len(fts) + 1} endpoints + {args.probes} probes; full evaluation {per_candidate_full:.2f}s per merge\n")
    n_full = np.mean([len(b) for b in benches.values()])
    setup_items = (len(fts) + 1 + args.probes) * n_full
    print(f"{'strategy':12} {'k':>4} {'estimator':12} {'MAE (pts)':>9} {'Spearman':>8} {'items/cand':>10} "
          f"{'passes/cand':>11} {'s/cand':>7} {'items x':>8} {'x w/ setup':>10}")
    for strategy in STRATEGIES:
        for k in ks:
            for est in ESTIMATORS:
                sel = [r for r in rows if r["strategy"] == strategy and r["k"] == k and r["estimator"] == est]
                if not sel:
                    continue
                mae = np.mean([r["mae"] for r in sel])
                rho = np.nanmean([r["spearman"] for r in sel])
                c = cost[strategy, k]
                per_bench = c["items"] / len(tasks)
                ratio = n_full / per_bench
                amortized = (n_full * args.merges) / (per_bench * args.merges + setup_items)
                secs = float(np.mean(c["seconds"])) if c["seconds"] else float("nan")
                print(f"{strategy:12} {k:>4} {est:12} {mae:9.2f} {rho:8.3f} {c['items']:10.1f} {c['passes']:11.1f} "
                      f"{secs:7.3f} {ratio:8.1f} {amortized:10.1f}")
                for r in sel:
                    r.update(items_per_cand=c["items"], passes_per_cand=c["passes"], seconds_per_cand=secs)
    print(f"\nadaptive: rounds of {args.round} items per benchmark, stop_sd {args.stop_sd}, prior sd floor {args.min_sd}; "
          f"batch {batch}; timed on {args.timed} merges (answers differing from the full run: {mismatches})")
    bands = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.01)]
    print("\nmean signed error (points) by the merge's true accuracy, gmp_irt and map (bias, not spread):")
    print(f"{'strategy':12} {'k':>4} {'estimator':10} " + " ".join(f"{f'[{lo:.1f},{min(hi, 1):.1f})':>11}" for lo, hi in bands))
    for (strategy, k, est), pairs in signed.items():
        if est in ("gmp_irt", "map"):
            e = np.array(pairs)
            cells = [e[(e[:, 0] >= lo) & (e[:, 0] < hi), 1] for lo, hi in bands]
            print(f"{strategy:12} {k:>4} {est:10} " + " ".join(f"{c.mean():+11.2f}" if c.size else f"{'-':>11}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
