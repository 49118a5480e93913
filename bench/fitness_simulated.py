"""Issue 22's error table reproduced on simulated real answers (fitness/simulate.py), with our own code.

For each preset (MMLU-Pro math: 1,351 ten-option items; ARC-Challenge: 735 four-option items) and seed:
1. draw the benchmark's true item parameters, a leaderboard of ``--leaderboard`` independent models, and a
   job: K = ``--parents`` endpoint models (independent draws) with ``--probes`` probe merges of them, i.e.
   17 known rows by default (3-5 endpoints + probes, a job's setting);
2. draw ``--candidates`` merges of the same parents (``merge_family``: Dirichlet weights, noise): their
   expected accuracy over the benchmark's items is the truth, their 0/1 answers what estimators see;
3. fit a 1-D 2PL (``fit_item_params``, MAP) on (a) the 17 known rows or (b) the leaderboard; the
   endpoints' abilities under those parameters give the endpoint prior and mp-IRT's endpoint thetas;
4. for k = 10 / 20 / 50 / 100: ``--draws`` random subsets of k items (one per draw, shared by all
   candidates, as a job scores every candidate on one subset) scored by subset mean, p-IRT, gp-IRT
   (lam 0.5), gmp-IRT (delta 0.5), map (p-IRT at the MAP ability under the endpoint prior), blend
   (``blend_irt``: subset mean, map and the known rows' mean, weights by leave-one-out on the known rows), and
   adaptive p-IRT (``run_cat``: rounds of 5, endpoint prior, no early stop); "adaptive, line": the same CAT
   estimates mapped by the line fitted on the probe rows' leave-one-out CATs (``fitness.adaptive.fit_line``);
   "auto", the product's default (``fitness.fitness.choose_estimator``: per world, setting and k, the plain
   CAT, the CAT mapped by its line, or the blend, by their leave-one-out errors on the probe rows; its sd
   is the chosen one's); plus
   "guess": the known rows' mean accuracy for every candidate (no evaluation at all).

Printed and written to bench/out/fitness_simulated.{md,json}: mean absolute error in accuracy points,
Spearman across candidates (mean over draws and seeds), and the share of truths inside the 90% interval
(estimate +- 1.645 sd) for the estimators that report an sd: map on fixed subsets and the CAT (both the
Laplace sd of ``fitness.adaptive.accuracy_sd``). With ``--describe`` (default) also the simulated-vs-real
statistics of ../shared/real-answers.md (``fitness.simulate.describe``; its 2PL fit on 915 rows is most of
that part's time).

    .venv/bin/python bench/fitness_simulated.py [--seeds 3] [--candidates 40] [--draws 5] [--no-describe]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitness.adaptive import (  # noqa: E402
    accuracy_sd,
    answers_prior,  # noqa: E402
    loo_cats,
    map_theta,
    predicted_accuracy,
    run_cat,
)
from fitness.estimators import blend_irt, calibrate_blend, estimate  # noqa: E402
from fitness.fitness import choose_estimator  # noqa: E402
from fitness.irt import estimate_theta, fit_item_params  # noqa: E402
from fitness.simulate import PRESETS, REAL, Simulation, describe, merge_family, simulate  # noqa: E402

FIXED = ["subset_mean", "p_irt", "gp_irt", "gmp_irt", "map"]
COLUMNS = FIXED + ["blend", "adaptive", "adaptive_line", "auto", "guess"]
EXTRA = ["adaptive_sd"]  # the CAT's estimates with calibrate_model_sd's sd: coverage only
LABELS = {"subset_mean": "subset mean", "p_irt": "p-IRT", "gp_irt": "gp-IRT", "gmp_irt": "gmp-IRT", "map": "map",
          "blend": "blend (LOO)", "adaptive": "adaptive p-IRT",
          "adaptive_line": "adaptive, line", "auto": "auto (default)",
          "guess": "guess known mean"}
NAMES = {"mmlu_pro_math": "MMLU-Pro math", "arc_challenge": "ARC-Challenge"}
Z90 = 1.6448536269514722


def one_world(cfg, seed: int, args) -> dict:
    """One seed of one preset: every (setting, k, column) -> list of per-draw result dicts."""
    rng = np.random.default_rng(seed)
    sim = Simulation.draw(cfg, rng)
    board = sim.answer(sim.abilities(args.leaderboard, rng), rng)
    parents = sim.abilities(args.parents, rng)
    probes, _ = merge_family(parents, args.probes, rng, noise_sd=args.merge_noise)
    known = sim.answer(np.vstack([parents, probes]), rng)
    cand, _ = merge_family(parents, args.candidates, rng, noise_sd=args.merge_noise)
    truth, Y = sim.accuracy(cand), sim.answer(cand, rng)
    guess = np.full_like(truth, known.mean())
    N, out = cfg.n_items, {"spread": float(truth.std(ddof=1) * 100), "fit_s": {}}
    # the same random subsets in both settings
    subsets = {k: [np.sort(rng.choice(N, k, replace=False)) for _ in range(args.draws)] for k in args.ks}
    for setting, rows in (("known", known), ("leaderboard", board)):
        t0 = time.perf_counter()
        params = fit_item_params(rows, "2pl")
        out["fit_s"][setting] = time.perf_counter() - t0
        ends = known[: args.parents]
        thetas = estimate_theta(ends, params)
        prior = answers_prior(params, ends)
        prior_of = answers_prior

        fit = (lambda r: fit_item_params(r, "2pl")) if setting == "known" else (lambda r: params)
        for k in args.ks:
            res = out.setdefault((setting, k), {c: [] for c in COLUMNS + EXTRA})
            res["guess"].append({"pred": guess, "truth": truth})
            # the weights by leave-one-out on the known rows (a leaderboard's parameters are not refitted)
            blend = calibrate_blend(known, args.parents, subsets[k][0], None, fit, prior_of, seed=seed)
            check = loo_cats(known, args.parents, fit, prior_of, k)
            calibrated, (a, b) = check.calibrated(), check.line()
            choice, _ = choose_estimator(check, blend)
            out.setdefault("chose_cat", {}).setdefault(setting, {})[k] = choice["estimator"] == "p_irt"
            for idx in subsets[k]:
                ys = Y[:, idx]
                for est in FIXED[:-1]:
                    res[est].append({"pred": np.asarray(estimate(est, ys, idx, None, params, thetas)), "truth": truth})
                pred, sd = [], []
                for y in ys:
                    th, prec = map_theta(params, idx, y, prior)
                    pred.append(predicted_accuracy(params, idx, y, th))
                    sd.append(accuracy_sd(params, idx, th, prec))
                res["map"].append({"pred": np.array(pred), "sd": np.array(sd), "truth": truth})
                res["blend"].append({"pred": np.asarray(blend_irt(ys, idx, None, params, prior=prior, blend=blend)),
                                     "sd": np.full(truth.shape, blend.rmse), "truth": truth})
            pred, sd = [], []
            for i in range(Y.shape[0]):
                r = run_cat(params, lambda j, i=i: Y[i, j], prior, budget=k, round_size=5, stop_sd=0)
                pred.append(r.accuracy)
                sd.append(r.sd)
            res["adaptive"].append({"pred": np.array(pred), "sd": np.array(sd), "truth": truth})
            res["adaptive_sd"].append({"pred": np.array(pred), "sd": np.hypot(np.array(sd), check.model_sd),
                                       "truth": truth})
            res["adaptive_line"].append({"pred": np.clip(a + b * np.array(pred), 0, 1),
                                         "sd": np.hypot(b * np.array(sd), calibrated.model_sd), "truth": truth})
            # auto: the chosen estimator's entries, the CAT's repeated once per draw so that worlds weigh alike
            chosen = "blend" if choice["estimator"] == "blend_irt" else "adaptive_line" if choice["line"] else "adaptive_sd"
            res["auto"] += [res[chosen][-1]] * args.draws if chosen != "blend" else res["blend"][-args.draws:]
    return out


def summarize(runs: list[dict]) -> dict:
    """MAE (points), Spearman and 90% coverage over all draws of all seeds."""
    err = np.concatenate([np.abs(r["pred"] - r["truth"]) for r in runs]) * 100
    rho = [spearmanr(r["pred"], r["truth"]).statistic for r in runs if np.ptp(r["pred"]) > 0]
    s = {"mae": float(err.mean()), "spearman": float(np.mean(rho)) if rho else float("nan")}
    if "sd" in runs[0]:
        inside = np.concatenate([np.abs(r["pred"] - r["truth"]) <= Z90 * r["sd"] for r in runs])
        s["coverage"] = float(inside.mean())
    return s


def describe_table(seed: int) -> tuple[list[str], dict]:
    """Simulated against real statistics, one row per statistic, both presets side by side."""
    def fmt(v, digits=2):
        if isinstance(v, (tuple, list)):
            return " / ".join(f"{x:.{digits}f}" for x in v)
        return f"{v:.{digits}f}"

    stats = {}
    for name, cfg in PRESETS.items():
        stats[name] = describe(simulate(cfg, REAL[name]["models"], seed).responses, seed=seed)
    rows = [("models x items", None), ("acc_mean", "model accuracy mean"), ("acc_sd", "model accuracy sd"),
            ("acc_q", "model accuracy 10/25/50/75/90 %"), ("p_q", "item p-value 10/25/50/75/90 %"),
            ("itc_q", "corrected item-total corr. 10/25/50/75/90 %"), ("itc_neg", "share item-total corr. < 0 (%)"),
            ("itc_below_0.1", "share item-total corr. < 0.1 (%)"), ("pca", "variance share PC1 / PC2 / PC3 (%)"),
            ("disc_q", "2PL discrimination 10/50/90 % (MAP, 60 % of models)"),
            ("irt_mae", "1-D 2PL accuracy from ability on ALL items, MAE held-out (points)")]
    lines = ["| statistic | MMLU-Pro math: simulated | real | ARC-Challenge: simulated | real |",
             "| --- | --- | --- | --- | --- |"]
    for key, label in rows:
        if key == "models x items":
            cells = [f"{stats[n]['models']} x {stats[n]['items']}" for n in PRESETS]
            lines.append(f"| models x items | {cells[0]} | same | {cells[1]} | same |")
            continue
        cells = []
        for n in PRESETS:
            sim, real = stats[n][key], REAL[n][key]
            if key == "pca":
                sim, real = tuple(100 * x for x in sim), tuple(100 * x for x in real)
            if key in ("itc_neg", "itc_below_0.1"):
                sim, real = 100 * sim, 100 * real
            digits = 3 if key in ("acc_mean", "acc_sd") else 1 if key in ("pca", "itc_neg", "itc_below_0.1") else 2
            cells += [fmt(sim, digits), fmt(real, digits)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--draws", type=int, default=5, help="random subsets per seed and k")
    ap.add_argument("--parents", type=int, default=4)
    ap.add_argument("--probes", type=int, default=13)
    ap.add_argument("--leaderboard", type=int, default=400)
    ap.add_argument("--merge-noise", type=float, default=0.3)
    ap.add_argument("--ks", default="10,20,50,100")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--no-describe", dest="describe", action="store_false")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    t_start = time.perf_counter()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} " \
              f"{platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    md = [f"Command: `{' '.join(['.venv/bin/python', 'bench/fitness_simulated.py', *sys.argv[1:]])}`", ""]
    record: dict = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine}
    record["args"]["out"] = str(args.out)

    if args.describe:
        t0 = time.perf_counter()
        lines, stats = describe_table(seed=0)
        md += ["Simulated (seed 0, as many models as the real matrix) against real answers:", "", *lines, "",
               f"(statistics in {time.perf_counter() - t0:.0f} s)", ""]
        record["describe"] = stats
        print("\n".join(md), flush=True)

    tables, record["results"] = [], {}
    head = ("| setting | k | " + " | ".join(LABELS[c] for c in COLUMNS) +
            " | Spearman (subset mean / map / blend / adaptive / auto) | 90 % coverage (map / blend / adaptive / "
            "adaptive with model sd / auto) | auto chose the CAT, line or not (%) |")
    tables += [head, "| --- " * (head.count("|") - 1) + "|"]
    compact = ["| setting | k items | " + " | ".join(LABELS[c] for c in COLUMNS) + " |",
               "| --- " * (len(COLUMNS) + 2) + "|"]
    for name in args.presets.split(","):
        cfg = PRESETS[name]
        t0 = time.perf_counter()
        worlds = [one_world(cfg, seed, args) for seed in range(args.seeds)]
        secs = time.perf_counter() - t0
        spread = float(np.mean([w["spread"] for w in worlds]))
        fits = {s: float(np.mean([w["fit_s"][s] for w in worlds])) for s in ("known", "leaderboard")}
        print(f"{name}: {secs:.0f} s for {args.seeds} seeds; candidates' true accuracy sd {spread:.1f} points; "
              f"fit {fits['known']:.1f} s (17 rows) / {fits['leaderboard']:.1f} s ({args.leaderboard} rows)",
              flush=True)
        record["results"][name] = {"seconds": secs, "candidate_sd_points": spread, "fit_seconds": fits}
        for setting in ("known", "leaderboard"):
            rows_n = args.parents + args.probes if setting == "known" else args.leaderboard
            label = f"{NAMES[name]}, IRT on {rows_n} {'known rows' if setting == 'known' else 'leaderboard models'}"
            per_k = {}
            for k in args.ks:
                runs = {c: [r for w in worlds for r in w[setting, k][c]] for c in COLUMNS + EXTRA}
                s = {c: summarize(runs[c]) for c in COLUMNS + EXTRA}
                per_k[k] = s
                record["results"][name][f"{setting}/{k}"] = s
                cat_share = 100 * float(np.mean([w["chose_cat"][setting][k] for w in worlds]))
                s["auto"]["chose_cat"] = cat_share
                tables.append(f"| {label} | {k} | " + " | ".join(f"{s[c]['mae']:.1f}" for c in COLUMNS) +
                              f" | {s['subset_mean']['spearman']:.2f} / {s['map']['spearman']:.2f} / "
                              f"{s['blend']['spearman']:.2f} / {s['adaptive']['spearman']:.2f} / "
                              f"{s['auto']['spearman']:.2f} | "
                              f"{100 * s['map']['coverage']:.0f} / {100 * s['blend']['coverage']:.0f} / "
                              f"{100 * s['adaptive']['coverage']:.0f} / {100 * s['adaptive_sd']['coverage']:.0f} / "
                              f"{100 * s['auto']['coverage']:.0f} | {cat_share:.0f} |")
            compact.append(f"| {label} | {' / '.join(map(str, args.ks))} | " +
                           " | ".join(" / ".join(f"{per_k[k][c]['mae']:.1f}" for k in args.ks) for c in COLUMNS) + " |")
    total = time.perf_counter() - t_start
    md += ["Mean absolute error in accuracy points (issue 22's layout):", "", *compact, "",
           "Per k, with Spearman across candidates and the share of truths inside the reported 90 % interval:", "",
           *tables, "", f"Machine: {machine}. Wall time {total:.0f} s."]
    record["seconds"] = total
    print("\n".join(md[-(len(compact) + len(tables) + 6):]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fitness_simulated.md").write_text("\n".join(md) + "\n")
    (args.out / "fitness_simulated.json").write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
