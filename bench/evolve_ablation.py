"""MERGE^3 ablation: an evolve job scored by full evaluation vs by IRT estimates on small subsets.

On the tiny zoo (tasks rev, cip, srt by default; one accuracy objective per task, maximized),
the same evolve job (method TIES, NSGA-II, same seed, population and generations, so the
same number of candidates) is run four times through `evolve.run`, changing only how a
candidate is scored:
- `full`: estimator `full`, every candidate answers all items of every benchmark (no IRT,
  no probes: nothing to fit);
- `random`, `anchor`, `entropy`: estimator `gmp_irt` on a k-item subset per benchmark
  (default k = 20) chosen by that strategy; IRT is fitted on the endpoints and P probe merges
  (default P = 11), evaluated in full once per run;
- `adaptive`, `adaptive_pop`: the same item budget, k items per benchmark, chosen per candidate
  by computerized adaptive testing (`fitness.adaptive`, rounds of `--round` items, early stop
  at `--stop-sd`), estimator `p_irt` (the CAT's MAP prediction), with the endpoint prior or the
  population prior (the abilities of the candidates already scored in the job).
Every run ends with evolve's final check: the members of its final front are evaluated in
full and the TRUE hypervolume of the front (reference point: accuracy 0 on every task) is
`result.true_hypervolume`.

Printed per run: candidates, items evaluated per candidate during the search and forward
passes (batches) per candidate (from the candidates' cost records), setup items (endpoints
are cached on disk per machine, so only the probes count here), the wall time of the search
stage and of the whole job (endpoints + probes + IRT + search; the final check is reported
apart since every run pays it; cached probe answers and IRT fits are deleted before each run,
so every run pays both as a first job does, and `repeat job x` is the ratio for a later job over
the same models, which reads them from the cache), the estimated and true hypervolume, and ratios against the
`full` run of the same invocation: items x (full items per candidate / items per candidate),
items x with setup (probe items amortized over the candidates), search-time x, job-time x,
and the true-HV fraction. The issue's targets: >= 50x fewer items per candidate, >= 20x less
wall time, >= 95% of the full run's true hypervolume.

    .venv/bin/python bench/evolve_ablation.py [--tasks rev,cip,srt] [--population 12] [--generations 6]
        [--size 20] [--probes 11] [--runs full,random,anchor,entropy,adaptive,adaptive_pop] [--json out.json]
        (a run named `<strategy>@P`, e.g. `anchor@4`, fits IRT on P probes instead of --probes;
        `<strategy>:<estimator>`, e.g. `anchor:map_irt`, scores with that estimator)
        [--zoo FOLDER]

Default: about 3-5 minutes on 2 shared CPU cores (torch on 1 thread; EVOMERGE_BENCH_THREADS).
Run folders: bench/out/evolve_ablation/<run>/.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from core.hooks import Hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, StageClock, evolve_spec, forget_setup, load_zoo, search_args, set_threads, table  # noqa: E402


def main() -> None:
    ap = search_args(__doc__, generations=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=20, help="subset items per benchmark")
    ap.add_argument("--probes", type=int, default=11)
    ap.add_argument("--fitter", default="map", choices=["map", "py-irt"], help="IRT fitter (fitness.irt)")
    ap.add_argument("--epochs", type=int, default=600, help="py-irt epochs")
    ap.add_argument("--runs", default="full,random,anchor,entropy,adaptive,adaptive_pop")
    ap.add_argument("--round", type=int, default=5, help="adaptive: items per round per benchmark")
    ap.add_argument("--stop-sd", type=float, default=0.0, help="adaptive: early stop (0: never)")
    ap.add_argument("--zoo", type=Path, help="a zoo folder to use as is (default: build or verify the preset's)")
    ap.add_argument("--out", type=Path, default=OUT / "evolve_ablation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    set_threads()
    from evolve.run import run

    zoo, manifest = load_zoo(args.preset, args.zoo)
    tasks = args.tasks.split(",")
    rows = []
    for name in args.runs.split(","):
        kind, _, n_probes = name.partition("@")  # e.g. anchor@4: anchor subsets, IRT on 4 probes
        kind, _, estimator = kind.partition(":")  # e.g. anchor:map_irt: that estimator instead of gmp_irt
        full = kind == "full"
        adaptive = kind.startswith("adaptive")
        extra = {"round": args.round, "stop_sd": args.stop_sd,
                 "prior": "population" if kind == "adaptive_pop" else "endpoints"} if adaptive else None
        spec = evolve_spec(zoo, manifest, tasks, method=args.method,
                           estimator="full" if full else estimator or ("p_irt" if adaptive else "gmp_irt"),
                           strategy="entropy" if full else "adaptive" if adaptive else kind, size=args.size,
                           population=args.population, generations=args.generations, seed=args.seed,
                           probes=0 if full else int(n_probes or args.probes), epochs=args.epochs, subset_extra=extra,
                           fitter=args.fitter)
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        forget_setup(spec)  # every run pays its probes and IRT fit, as a user's first job over these models does
        clock = StageClock()
        t0 = time.perf_counter()
        res = run(spec, out, hooks=Hooks(clock))
        wall = time.perf_counter() - t0
        st = clock.seconds()
        cands = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
        n = len(cands)
        row = {
            "run": name, "candidates": n,
            "items_per_cand": float(np.mean([c["cost"]["items"] for c in cands])),
            "passes_per_cand": float(np.mean([c["cost"]["forward_passes"] for c in cands])),
            "merge_s_per_cand": float(np.mean([c["cost"]["merge_seconds"] for c in cands])),
            "score_s_per_cand": float(np.mean([c["cost"]["score_seconds"] for c in cands])),
            "setup_items": res.cost["probe_items"],
            "search_s": st.get("search", float("nan")),
            "job_s": sum(st.get(k, 0.0) for k in ("endpoints", "probes", "irt", "search")),
            "probes_s": st.get("probes", 0.0),
            "irt_s": st.get("irt", 0.0),
            "final_s": st.get("final_check", float("nan")),
            "wall_s": wall,
            "hv": res.hypervolume, "true_hv": res.true_hypervolume, "front": len(res.front),
            "full_items_per_cand": res.cost["full_items_per_candidate"],
        }
        rows.append(row)
        print(f"[{name}] {n} candidates, search {row['search_s']:.1f}s, job {row['job_s']:.1f}s, "
              f"true HV {row['true_hv']:.4f}", file=sys.stderr, flush=True)

    ref = next((r for r in rows if r["run"] == "full"), None)
    print(f"\nzoo {args.preset}, tasks {','.join(tasks)}, method {args.method}, NSGA-II population {args.population} x "
          f"{args.generations} generations, seed {args.seed}; subsets of {args.size} items per benchmark "
          f"({rows[0]['full_items_per_cand']} items per candidate in full), gmp_irt fitted on "
          f"{len(tasks) + 1} endpoints + {args.probes} probes\n")
    headers = ["run", "cands", "items/cand", "passes/cand", "setup items", "search s", "job s", "probes s", "irt s", "final s",
               "est HV", "true HV", "items x", "items x w/ setup", "search x", "job x", "repeat job x", "true HV frac"]
    body = []
    for r in rows:
        if ref:
            ix = ref["items_per_cand"] / r["items_per_cand"]
            ixs = (ref["items_per_cand"] * ref["candidates"] + ref["setup_items"]) / (
                r["items_per_cand"] * r["candidates"] + r["setup_items"])
            sx, jx = ref["search_s"] / r["search_s"], ref["job_s"] / r["job_s"]
            rjx = ref["job_s"] / (r["job_s"] - r["probes_s"] - r.get("irt_s", 0.0))
            hvf = r["true_hv"] / ref["true_hv"] if ref["true_hv"] else None
        else:
            ix = ixs = sx = jx = rjx = hvf = None
        label = r["run"] if r["run"] == "full" or ":" in r["run"] else f"p_irt/{r['run']}" \
            if r["run"].startswith("adaptive") else f"gmp_irt/{r['run']}"
        body.append([label, r["candidates"], r["items_per_cand"],
                     r["passes_per_cand"], r["setup_items"], r["search_s"], r["job_s"], r["probes_s"], r.get("irt_s", 0.0), r["final_s"],
                     r["hv"], r["true_hv"], ix, ixs, sx, jx, rjx, hvf])
    print(table(headers, body))
    print("\nper candidate (s): " + ", ".join(f"{r['run']}: merge {r['merge_s_per_cand']:.3f} + score "
                                             f"{r['score_s_per_cand']:.3f}" for r in rows))
    print("job s = endpoints (cached) + probes + IRT fit + search; the final check (front members in full) is apart.\n"
          "Probe answers and IRT fits are forgotten before each run, so job s is a first job's; repeat job x leaves\n"
          "the probes and the IRT fit out, as a later job over the same models reads both from the per-machine cache.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
