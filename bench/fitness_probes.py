"""How many probe rows the item fit needs: the learning curve behind `fitness.probes`.

Per simulated world (``fitness.simulate``: a preset, 4 parents, a family of 40 merge candidates
and up to 35 probe merges of the same parents), item parameters are fitted (MAP 2PL) on the
parents and the first n probes for n = 7, 11, 15, ..., 35, and `estimator: auto` picks and scores
the candidates as a job would (``choose_estimator`` on those rows: the plain CAT, the CAT mapped
by its line, or blend_irt on one random subset of k items). Printed: the mean
absolute error of auto and of the plain CAT on the candidates' true accuracies, per n; then the
rule a job runs (`fitness.probes.probe_gain`: from 11 probes, batches of 4 while the last batch
lowered the earlier probes' leave-one-out CAT errors beyond one standard error) with where it
stopped and auto's error there, against staying at 11 and going to 35. The probes' cost cap
(``irt.probe_share``) is left out here: this is what the rows are worth, not what they cost.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fitness_probes.py [--seeds 3] [--presets mmlu_pro_math,arc_challenge]
        [--merge-noise 0.3] [--ks 10,20]

Output: a table on stdout and bench/out/fitness_probes.{md,json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
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
from fitness.probes import probe_gain  # noqa: E402
from fitness.simulate import PRESETS, Simulation, merge_family  # noqa: E402

PARENTS, FIRST, BATCH, MOST = 4, 11, 4, 35
CURVE = list(range(FIRST - BATCH, MOST + 1, BATCH))  # 7, 11, ..., 35


class MemoFit:
    """fit_item_params with its results kept by the rows' bytes: the leave-one-out fits of
    different checks on the same rows are the same fits."""

    def __init__(self):
        self.fits, self.calls = {}, 0

    def __call__(self, rows):
        key = hashlib.sha1(np.ascontiguousarray(rows).tobytes() + str(rows.shape).encode()).hexdigest()
        if key not in self.fits:
            self.calls += 1
            self.fits[key] = fit_item_params(rows, "2pl")
        return self.fits[key]


def one_world(name: str, seed: int, args) -> dict:
    rng = np.random.default_rng(seed)
    sim = Simulation.draw(PRESETS[name], rng)
    parents = sim.abilities(PARENTS, rng)
    cand, _ = merge_family(parents, args.candidates, rng, noise_sd=args.merge_noise)
    probes, _ = merge_family(parents, MOST, rng, noise_sd=args.merge_noise)
    truth, Y = sim.accuracy(cand), sim.answer(cand, rng)
    known_all = sim.answer(np.vstack([parents, probes]), rng)
    subsets = {k: np.sort(rng.choice(sim.config.n_items, k, replace=False)) for k in args.ks}
    fit = MemoFit()
    out = {"curve": {}, "checks": {}}
    for n in CURVE:
        known = known_all[: PARENTS + n]
        params = fit(known)
        prior = answers_prior(params, known[:PARENTS])
        for k in args.ks:
            check = loo_cats(known, PARENTS, fit, answers_prior, k)
            blend = calibrate_blend(known, PARENTS, subsets[k], None, fit, answers_prior, seed=seed)
            choice, _ = choose_estimator(check, blend)
            cat = np.array([run_cat(params, lambda j, i=i: Y[i, j], prior, k).accuracy for i in range(len(truth))])
            if choice["estimator"] == "blend_irt":
                auto = np.asarray(blend_irt(Y[:, subsets[k]], subsets[k], None, params, prior=prior, blend=blend))
            elif choice["line"]:
                auto = np.clip(choice["line"]["intercept"] + choice["line"]["slope"] * cat, 0, 1)
            else:
                auto = cat
            out["curve"][(n, k)] = {"auto": float(np.abs(auto - truth).mean() * 100),
                                    "cat": float(np.abs(cat - truth).mean() * 100)}
            out["checks"][(n, k)] = check
    for k in args.ks:  # the job's rule: from FIRST probes, a batch at a time while the last one helped
        n = FIRST + BATCH
        while n <= MOST:
            gain = probe_gain(known_all[: PARENTS + n], PARENTS, BATCH, fit, answers_prior, k,
                              with_new=out["checks"][(n, k)])
            if not gain.helped:
                break
            n += BATCH
        out.setdefault("stop", {})[k] = min(n, MOST)
    out.pop("checks")
    out["fits"] = fit.calls
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--merge-noise", type=float, default=0.3)
    ap.add_argument("--ks", default="10,20")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    t0, worlds = time.perf_counter(), {}
    for name in args.presets.split(","):
        for seed in range(args.seeds):
            worlds[(name, seed)] = one_world(name, seed, args)
            print(f"# {name} seed {seed}: {worlds[(name, seed)]['fits']} fits, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    lines = [f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`", "",
             "Mean absolute error in accuracy points over the candidates of every seed, by probe rows n "
             f"(plus {PARENTS} parents): auto / plain CAT", "",
             "| preset | k | " + " | ".join(f"n = {n}" for n in CURVE) + " | rule stopped at n (per seed) "
             "| auto at the rule's n / at 11 / at 35 |",
             "| --- | --- | " + " | ".join("---" for _ in CURVE) + " | --- | --- |"]
    summary = {}
    for name in args.presets.split(","):
        mine = [w for (p, _), w in worlds.items() if p == name]
        for k in args.ks:
            cells = []
            for n in CURVE:
                a = np.mean([w["curve"][(n, k)]["auto"] for w in mine])
                c = np.mean([w["curve"][(n, k)]["cat"] for w in mine])
                cells.append(f"{a:.2f} / {c:.2f}")
            stops = [w["stop"][k] for w in mine]
            at_rule = np.mean([w["curve"][(w["stop"][k], k)]["auto"] for w in mine])
            at_first = np.mean([w["curve"][(FIRST, k)]["auto"] for w in mine])
            at_most = np.mean([w["curve"][(MOST, k)]["auto"] for w in mine])
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {', '.join(map(str, stops))} | "
                         f"{at_rule:.2f} / {at_first:.2f} / {at_most:.2f} |")
            summary[f"{name}/{k}"] = {"curve_auto": [np.mean([w["curve"][(n, k)]["auto"] for w in mine]) for n in CURVE],
                                      "curve_cat": [np.mean([w["curve"][(n, k)]["cat"] for w in mine]) for n in CURVE],
                                      "stops": stops, "auto_at_rule": at_rule, "auto_at_11": at_first,
                                      "auto_at_35": at_most}
    lines += ["", f"Machine: {platform.machine()}, CPython {platform.python_version()}, merge noise "
              f"{args.merge_noise}, {args.seeds} seeds, {args.candidates} candidates. "
              f"Wall time {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.merge_noise == 0.3 else f"_noise{args.merge_noise:g}"
    (args.out / f"fitness_probes{suffix}.md").write_text(text + "\n")
    (args.out / f"fitness_probes{suffix}.json").write_text(json.dumps({"curve_n": CURVE, "summary": summary}, indent=2,
                                                                      default=float))


if __name__ == "__main__":
    main()
