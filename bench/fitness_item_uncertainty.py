#!/usr/bin/env python3
"""Does the CAT gain from knowing how uncertain its item parameters are? (issue 22, an experiment)

With item parameters fitted on a job's 17 known rows, each item's (log a, b) is uncertain. This
takes that uncertainty into account the textbook way and measures what it buys on the simulator
(`fitness.simulate`, the presets calibrated to real LLM answers):

1. per item, the Laplace posterior of (log a_j, b_j) given the known rows' MAP abilities: the
   inverse of sum_i w_ij g_ij g_ij^T + the MAP fitter's prior precision, with
   w_ij = P_ij (1 - P_ij) and g_ij = (a_j theta_i, -1) the logit's gradient;
2. the item curve averaged over it (MacKay 1992, the probit approximation of a logistic-normal
   mean): P_j(theta) = sigmoid(z / sqrt(1 + pi var_z / 8)), z = a_j theta - b_j, var_z the
   logit's variance at theta. Its information integrates over the parameters' uncertainty, so
   a discrimination that a few rows overstate buys less.

Arms, on the same candidates and answers: the plain CAT (`run_cat`: rounds of 5, endpoint
prior); "moderated": that CAT with the averaged curves for selection, ability and prediction
(refreshed at each estimate); "select only": averaged curves choose the items, the MAP curves
estimate; "x4": the moderated arm with the parameter variances inflated 4x. Printed: mean
absolute error (accuracy points) and the share of truths inside the CAT's 90 % interval.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fitness_item_uncertainty.py [--seeds 3] [--candidates 40]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fitness.adaptive import (  # noqa: E402
    accuracy_sd,
    answers_prior,
    map_theta,
    predicted_accuracy,
    run_cat,
    select_batch,
)
from fitness.irt import MAP_PRIOR_SD, ItemParams, estimate_theta, fit_item_params, sigmoid  # noqa: E402
from fitness.simulate import PRESETS, Simulation, merge_family  # noqa: E402

Z90 = 1.6448536269514722
ROUND = 5


def item_covariances(params: ItemParams, rows: np.ndarray) -> np.ndarray:
    """[items, 3]: var(log a), cov(log a, b), var(b) of each item's Laplace posterior."""
    theta = estimate_theta(rows, params)[:, 0]
    a, b = params.a[:, 0], params.b
    p = sigmoid(np.clip(np.outer(theta, a) - b, -30, 30))
    w = p * (1 - p)
    g = a[None, :] * theta[:, None]  # d z / d log a
    h11 = (w * g ** 2).sum(0) + MAP_PRIOR_SD["log_a"] ** -2
    h12 = -(w * g).sum(0)
    h22 = w.sum(0) + MAP_PRIOR_SD["b"] ** -2
    det = h11 * h22 - h12 ** 2
    return np.stack([h22 / det, -h12 / det, h11 / det], 1)


def averaged(params: ItemParams, cov: np.ndarray, theta: float, inflate: float) -> ItemParams:
    """The curves averaged over the parameters' posterior, linearized at `theta`."""
    a, b = params.a[:, 0], params.b
    g = a * theta
    var_z = inflate * (g ** 2 * cov[:, 0] - 2 * g * cov[:, 1] + cov[:, 2])
    k = 1 / np.sqrt(1 + np.pi * var_z / 8)
    return ItemParams((a * k)[:, None], b * k)


def moderated_cat(params, cov, answer, prior, budget: int, inflate: float, select_only: bool):
    items, ys = [], []
    theta, prec = prior.mean.copy(), prior.precision.copy()
    est = params
    while len(items) < budget:
        chosen = select_batch(averaged(params, cov, float(theta[0]), inflate), theta, prec, items,
                              min(ROUND, budget - len(items)))
        items += [int(j) for j in chosen]
        ys += [float(v) for v in answer(chosen)]
        for _ in range(1 if select_only else 3):  # the averaged curves depend on the estimate
            theta, prec = map_theta(est, items, ys, prior)
            est = params if select_only else averaged(params, cov, float(theta[0]), inflate)
    return predicted_accuracy(est, items, ys, theta), accuracy_sd(est, items, theta, prec)


ARMS = {"plain CAT": None, "moderated": (1.0, False), "select only": (1.0, True), "moderated x4": (4.0, False)}


def world(preset: str, seed: int, noise: float, ks, n_candidates: int) -> dict:
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    sim = Simulation.draw(cfg, rng)
    parents = sim.abilities(4, rng)
    probes, _ = merge_family(parents, 13, rng, noise_sd=noise)
    known = sim.answer(np.vstack([parents, probes]), rng)
    cand, _ = merge_family(parents, n_candidates, rng, noise_sd=noise)
    truth, Y = sim.accuracy(cand), sim.answer(cand, rng)
    params = fit_item_params(known, "2pl")
    cov = item_covariances(params, known)
    prior = answers_prior(params, known[:4])
    out = {}
    for k in ks:
        for arm, how in ARMS.items():
            rows = []
            for i in range(len(Y)):
                answer = lambda j, i=i: Y[i, j]  # noqa: E731
                if how is None:
                    r = run_cat(params, answer, prior, budget=k, round_size=ROUND, stop_sd=0)
                    rows.append((r.accuracy, r.sd))
                else:
                    rows.append(moderated_cat(params, cov, answer, prior, k, *how))
            est = np.array(rows)
            out[(k, arm)] = (np.abs(est[:, 0] - truth) * 100, np.abs(est[:, 0] - truth) <= Z90 * est[:, 1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--ks", default="10,20,50")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.time()
    print("| benchmark | merge family | k | " + " | ".join(f"{a}: MAE / 90 % cover" for a in ARMS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in ARMS) + " |")
    for preset in ("mmlu_pro_math", "arc_challenge"):
        for family, noise in (("default", 0.3), ("wide", 1.0)):
            runs = [world(preset, seed, noise, ks, args.candidates) for seed in range(args.seeds)]
            for k in ks:
                cells = []
                for arm in ARMS:
                    err = np.concatenate([r[(k, arm)][0] for r in runs])
                    cover = np.concatenate([r[(k, arm)][1] for r in runs])
                    cells.append(f"{err.mean():.2f} / {cover.mean() * 100:.0f} %")
                print(f"| {preset} | {family} | {k} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{args.seeds} seeds x {args.candidates} candidates, item parameters from 17 known rows "
          f"(4 parents + 13 probes); {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
