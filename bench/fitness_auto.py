"""``estimator: auto`` on recorded answers: what it chooses per benchmark, and its error against the CAT's,
the blend's and the subset mean's.

Input: the response matrices ``bench/fitness_estimators.py --dump FILE.npz`` writes (per benchmark: the
endpoints' and probes' full answers, what a job knows; the held-out merges' full answers, whose accuracies
are the truth). Per benchmark and k, as a job does at its start, ``fitness.fitness.choose_estimator``
compares the CAT's leave-one-out error on the probe rows (``fitness.adaptive.loo_cats``) with the blend's
(``calibrate_blend``'s nested ``check_errors``, on a random subset of k items); then every held-out merge is
scored by the CAT (rounds of 5, endpoint prior; raw, and mapped by the line fitted on the probe rows, as auto
reports it) and by ``blend_irt`` and the subset mean on ``--draws``
random subsets of k items (the blend's weights calibrated for each subset, as a job calibrates them for
its own), and auto's error is the chosen one's. The item parameters of every leave-one-out fit are fitted
once per benchmark and reused for every k and draw (the fits are deterministic).

    .venv/bin/python bench/fitness_estimators.py --preset small --dump bench/out/zoo-small.npz
    .venv/bin/python bench/fitness_auto.py bench/out/zoo-small.npz [--ks 10,20,50,100] [--draws 5]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitness.adaptive import answers_prior, loo_cats, run_cat  # noqa: E402
from fitness.estimators import blend_irt, calibrate_blend  # noqa: E402
from fitness.fitness import choose_estimator  # noqa: E402
from fitness.irt import fit_item_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", type=Path)
    ap.add_argument("--ks", default="10,20,50,100")
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    data = np.load(args.dump)
    tasks = sorted({key.split("/", 1)[1] for key in data.files})
    ks = [int(k) for k in args.ks.split(",")]
    memo: dict[str, object] = {}

    def fit(rows):
        key = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float64).tobytes() + str(rows.shape).encode()).hexdigest()
        if key not in memo:
            memo[key] = fit_item_params(rows, "2pl")
        return memo[key]

    lines = ["| benchmark | k | chose | LOO MAE CAT / with line / blend (points) | MAE CAT | MAE CAT with line | MAE blend "
             "| MAE auto | MAE subset mean |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    totals: dict[int, dict[str, list]] = {k: {c: [] for c in ("cat", "line", "blend", "auto", "mean")} for k in ks}
    t0 = time.perf_counter()
    for t in tasks:
        ends, probes, truth_rows = (data[f"{kind}/{t}"].astype(float) for kind in ("endpoints", "probes", "truth"))
        Y, n_end = np.vstack([ends, probes]), len(ends)
        params = fit(Y)
        prior = answers_prior(params, ends)
        truth = truth_rows.mean(axis=1)
        rng = np.random.default_rng(0)
        for k in ks:
            if k >= Y.shape[1]:
                continue
            subsets = [np.sort(rng.choice(Y.shape[1], k, replace=False)) for _ in range(args.draws)]
            check = loo_cats(Y, n_end, fit, answers_prior, k)
            blends = [calibrate_blend(Y, n_end, s, None, fit, answers_prior, seed=d) for d, s in enumerate(subsets)]
            choice, _ = choose_estimator(check, blends[0])
            a, b = check.line()
            cat = np.array([run_cat(params, lambda idx, i=i: truth_rows[i, idx], prior, k).accuracy
                            for i in range(len(truth))])
            mae_cat = float(np.abs(cat - truth).mean() * 100)
            mae_line = float(np.abs(np.clip(a + b * cat, 0, 1) - truth).mean() * 100)
            mae_blend = float(np.mean([np.abs(blend_irt(truth_rows[:, s], s, None, params, prior=prior, blend=b)
                                              - truth).mean() for s, b in zip(subsets, blends)]) * 100)
            mae_mean = float(np.mean([np.abs(truth_rows[:, s].mean(axis=1) - truth).mean() for s in subsets]) * 100)
            mae_auto = mae_blend if choice["estimator"] == "blend_irt" else mae_line if choice["line"] else mae_cat
            for c, v in (("cat", mae_cat), ("line", mae_line), ("blend", mae_blend), ("auto", mae_auto),
                         ("mean", mae_mean)):
                totals[k][c].append(v)
            loo = choice["loo_mae"]
            chose = "blend" if choice["estimator"] == "blend_irt" else "CAT, line" if choice["line"] else "CAT"
            lines.append(f"| {t} | {k} | {chose} | {100 * loo['p_irt']:.1f} / {100 * loo['p_irt_line']:.1f} / "
                         f"{100 * loo['blend_irt']:.1f} | {mae_cat:.2f} | {mae_line:.2f} | "
                         f"{mae_blend:.2f} | "
                         f"{mae_auto:.2f} | {mae_mean:.2f} |")
            print(lines[-1], flush=True)
    for k in ks:
        if totals[k]["cat"]:
            m = {c: float(np.mean(v)) for c, v in totals[k].items()}
            lines.append(f"| mean of {len(totals[k]['cat'])} | {k} | | | {m['cat']:.2f} | {m['line']:.2f} | {m['blend']:.2f} | "
                         f"{m['auto']:.2f} | {m['mean']:.2f} |")
    print("\n".join(lines))
    print(f"{args.dump.name}: {len(tasks)} benchmarks, {len(truth)} held-out merges, {args.draws} subsets per k; "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
