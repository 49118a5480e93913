"""Scale-out: an evolve job's candidates per minute on N Ray evaluators against the local backend.

For each zoo preset (`--presets`, default tiny,small) one evolve job is built: the zoo's
fine-tunes of `--tasks` (default rev,cip,srt) merged by `--method` (ties), NSGA-II with population
P (`--population`, 8) for G generations (`--generations`, 4), seed `--seed`, device cpu, one
accuracy objective per task with the product's default fitness (p_irt on 20 adaptive items per
benchmark, prior from the endpoints; `subset`/`estimator` left out of the spec), 11 probes, the
final check of 8 front members. The same job then runs in two arms, each in a fresh subprocess
(this script re-invoking itself), so torch's thread settings and Ray do not leak between them:

- local: `execution: {backend: local}`, torch on all cores (`torch.set_num_threads(os.cpu_count())`;
  `--local-threads K` for K threads instead);
- ray: a local Ray cluster started by the arm (`ray.init(num_cpus=os.cpu_count())`) and
  `execution: {backend: ray, evaluators: N (--evaluators, 2), cpus_per_evaluator: 1}`
  (each actor sets torch to 1 thread; the driver's own torch to 1 thread too).

Before the two arms a warm-up job (same spec, 1 generation, no final check, local backend) fills
the per-machine response cache (`EVOMERGE_CACHE`, default <repo>/.cache/evomerge, shared with
the other benchmarks): the endpoints' and probes' answers and the IRT fits, so both arms start
from the same cache state (every endpoint and probe answer and the IRT fit read from the cache).
Candidates' subset answers and the final check are never cached, so both arms compute them.

Measured from the job's hook events (`evolve.run(..., hooks=Hooks(cb))`), on the driver's clock:
- search s: from the "search" stage event to the last progress event (one per generation);
- candidates/min: candidates scored in the search / search minutes (speed-up: ray / local, target
  >= 1.7x with 2 evaluators on 2 cores);
- setup s: from the call of `evolve.run` to the "search" stage event (opening the evaluators --
  for ray the actors' start-up --, endpoints, probes, IRT: all cached here); job s: the whole
  `evolve.run` call (setup + search + final check); the Ray cluster's own start is outside it and
  printed in the notes;
- identical: the two arms' candidates.jsonl (every candidate's genome and objectives, in order)
  and front.json (the front's ids and true objectives) are equal.

A projection for GPU evaluators follows, from the ray arm's measured costs (generations 2..G;
the first generation's step also holds the search's start-up): per-candidate evaluator time t_c
= the evaluators' busy seconds in those steps (`cost.evaluators` / the progress events' snapshots,
dispatch to result on the driver's clock) / candidates in them, and the driver's time per step d =
step wall time - the busiest evaluator's busy seconds in that step (pymoo's ask/tell, priors,
recording, checkpoint). Model: a step asks B = P genomes and takes d + ceil(B / N) * t_c on N
evaluators, so candidates/min(N) = 60 B / (d + ceil(B / N) t_c): Amdahl's law with d the serial
part, and no gain past N = B.

Each arm's result is written to bench/out/scale_out/<preset>/<arm>.json, its run folder to
bench/out/scale_out/<preset>/<arm>/, the table to bench/out/scale_out/results.json.

    .venv/bin/python bench/scale_out.py [--presets tiny,small] [--population 8] [--generations 4]
        [--evaluators 2] [--seed 0]
    .venv/bin/python bench/scale_out.py --quick      # smoke run: tiny, population 4, 2 generations,
                                                     # into bench/out/scale_out/quick/

The small zoo is built first if .cache/zoo-small-seed0 is missing (about 8 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evolve_common import OUT, ROOT, StageClock, evolve_spec, load_zoo, table

ARMS = ("warmup", "local", "ray")
PROJECT_N = (1, 2, 4, 8)
STAGES = ("endpoints", "probes", "irt")


# ---------------------------------------------------------------- one arm (in its own subprocess)

def run_arm(arm: str, spec_path: Path, run_dir: Path, result_path: Path, local_threads: int) -> None:
    """Runs the job of `spec_path` in this (fresh) process and writes what the hooks saw."""
    import torch

    spec = json.loads(spec_path.read_text())
    cores = os.cpu_count() or 1
    ray_start = None
    if arm == "ray":
        import ray

        torch.set_num_threads(1)  # the driver only decides; the actors score (1 thread each)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning", log_to_driver=False)
        ray_start = time.perf_counter() - t0
    else:
        torch.set_num_threads(local_threads)
    from core.hooks import Hooks
    from evolve.run import run

    shutil.rmtree(run_dir, ignore_errors=True)
    clock = StageClock()
    res = run(spec, run_dir, hooks=Hooks(clock), overwrite=True)
    job_s = time.perf_counter() - clock.t0
    marks = dict(clock.marks)
    if arm == "ray":
        import ray

        ray.shutdown()
    doc = {"arm": arm, "execution": spec.get("execution", {"backend": "local"}), "torch_threads": torch.get_num_threads(),
           "cores": cores, "ray_start_s": ray_start, "job_s": job_s, "marks": marks,
           "stages": clock.seconds(), "progress": [{k: p[k] for k in ("t", "generation", "evaluations", "evaluators")}
                                                   for p in clock.progress],
           "cost": res.cost, "hypervolume": res.hypervolume, "true_hypervolume": res.true_hypervolume}
    result_path.write_text(json.dumps(doc, indent=2))


# ---------------------------------------------------------------- driver

def spawn(arm: str, spec: dict, folder: Path, local_threads: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / f"{arm}.spec.json", folder / f"{arm}.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_arm", arm, "--_spec", str(spec_path),
           "--_run", str(folder / arm), "--_result", str(result_path),
           "--local-threads", str(local_threads)]
    print(f"[{folder.name}] {arm} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, cwd=ROOT, env=os.environ.copy())
    if r.returncode != 0:
        raise SystemExit(f"[{folder.name}] the {arm} arm failed (exit {r.returncode})")
    doc = json.loads(result_path.read_text())
    doc["process_s"] = time.perf_counter() - t0
    result_path.write_text(json.dumps(doc, indent=2))
    print(f"[{folder.name}] {arm}: job {doc['job_s']:.1f} s (process {doc['process_s']:.1f} s)",
          file=sys.stderr, flush=True)
    return doc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "candidates.jsonl").read_text().splitlines()]


def compare(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two run folders hold the same candidates (genome, objectives) and front (ids, true objectives)."""
    ra, rb = records(a), records(b)
    if len(ra) != len(rb):
        return False, f"{len(ra)} against {len(rb)} candidates"
    for x, y in zip(ra, rb):
        if x["genome"] != y["genome"] or x["objectives"] != y["objectives"]:
            return False, f"candidate {x['id']} differs: {x['objectives']} against {y['objectives']}"
    fa, fb = (json.loads((p / "front.json").read_text())["front"] for p in (a, b))
    ka, kb = ([(c["id"], c["true_objectives"]) for c in f] for f in (fa, fb))
    if ka != kb:
        return False, f"front differs: {ka} against {kb}"
    return True, f"{len(ra)} candidates, front of {len(fa)}"


def search_metrics(doc: dict) -> dict:
    """Search time and rate, and the per-step costs of generations 2..G (see the docstring)."""
    t_search = doc["marks"]["search"]
    prog = doc["progress"]
    out = {"search_s": prog[-1]["t"] - t_search, "candidates": prog[-1]["evaluations"],
           "setup_s": t_search, "stages": doc["stages"]}
    out["cpm"] = 60 * out["candidates"] / out["search_s"]
    steps = []
    for p, q in itertools.pairwise(prog):
        busy = [e2["candidate_seconds"] - e1["candidate_seconds"] for e1, e2 in zip(p["evaluators"], q["evaluators"])]
        steps.append({"wall": q["t"] - p["t"], "candidates": q["evaluations"] - p["evaluations"],
                      "busy": busy, "driver": (q["t"] - p["t"]) - max(busy)})
    out["first_step_s"] = prog[0]["t"] - t_search
    if steps and sum(s["candidates"] for s in steps):
        out["t_c"] = sum(sum(s["busy"]) for s in steps) / sum(s["candidates"] for s in steps)
        out["d"] = sum(s["driver"] for s in steps) / len(steps)
        out["batch"] = sum(s["candidates"] for s in steps) / len(steps)
    # the evaluators' own report: seconds of their candidate (estimate) tasks
    ev = doc["cost"]["evaluators"]
    out["report_s_per_candidate"] = sum(e["candidate_seconds"] for e in ev) / max(sum(e["candidates"] for e in ev), 1)
    return out


def in_evaluator_seconds(run_dir: Path) -> float:
    """Mean merge + score seconds of a candidate, measured inside the evaluator."""
    rs = records(run_dir)
    return sum(r["cost"]["merge_seconds"] + r["cost"]["score_seconds"] for r in rs) / max(len(rs), 1)


def per_generation_seconds(run_dir: Path) -> list[float]:
    """Mean merge + score seconds inside the evaluator, per generation (a slow generation on one arm
    only is usually another job on the machine: torch's threads spinning against it)."""
    by: dict[int, list[float]] = {}
    for r in records(run_dir):
        by.setdefault(r["generation"], []).append(r["cost"]["merge_seconds"] + r["cost"]["score_seconds"])
    return [sum(v) / len(v) for _, v in sorted(by.items())]


def projected_cpm(d: float, t_c: float, batch: float, n: int) -> float:
    return 60 * batch / (d + math.ceil(batch / n) * t_c)


def machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ray
    import torch

    return (f"{os.cpu_count()} cores ({model or platform.processor()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--tasks", default="rev,cip,srt")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--evaluators", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local-threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the local arm (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny only, population 4, 2 generations")
    ap.add_argument("--out", type=Path, default=OUT / "scale_out")
    ap.add_argument("--_arm", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._arm:
        run_arm(args._arm, args._spec, args._run, args._result, args.local_threads)
        return
    if args.quick:
        args.presets, args.population, args.generations = "tiny", 4, 2
        args.out = args.out / "quick"
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    presets = [p for p in args.presets.split(",") if p]
    results: dict[str, dict] = {}
    for preset in presets:
        zoo, manifest = load_zoo(preset)
        spec = evolve_spec(zoo, manifest, args.tasks.split(","), method=args.method, population=args.population,
                           generations=args.generations, seed=args.seed)
        # the product's default fitness: p_irt on adaptive subsets of 20 items (estimator, subset left out)
        spec["objectives"] = [{"benchmark": o["benchmark"], "name": o["name"]} for o in spec["objectives"]]
        folder = args.out / preset
        warm = json.loads(json.dumps(spec))
        warm["search"]["generations"], warm["final_check"] = 1, False
        spawn("warmup", warm, folder, args.local_threads)
        local = spawn("local", spec, folder, args.local_threads)
        ray_spec = {**spec, "execution": {"backend": "ray", "evaluators": args.evaluators, "cpus_per_evaluator": 1}}
        ray_doc = spawn("ray", ray_spec, folder, args.local_threads)
        same, why = compare(folder / "local", folder / "ray")
        results[preset] = {"local": local, "ray": ray_doc, "identical": same, "why": why,
                           "metrics": {"local": search_metrics(local), "ray": search_metrics(ray_doc)},
                           "in_evaluator_s": {a: in_evaluator_seconds(folder / a) for a in ("local", "ray")},
                           "per_generation_s": {a: per_generation_seconds(folder / a) for a in ("local", "ray")}}
    load_after = os.getloadavg()

    print(f"\nMachine: {machine()}; 1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"(other jobs may share the machine: times vary, ratios are from the same run).")
    print(f"Job: zoo preset(s) {','.join(presets)}, tasks {args.tasks}, method {args.method}, NSGA-II population "
          f"{args.population} x {args.generations} generations, seed {args.seed}, device cpu; fitness: p_irt on 20 "
          f"adaptive items per benchmark (the defaults), 11 probes, final check of up to 8 front members.")
    print(f"Arms: local = backend local, torch on {args.local_threads} threads; ray = a local Ray cluster of {cores} CPUs, "
          f"{args.evaluators} evaluators x 1 CPU (1 torch thread each). Each arm in a fresh subprocess, after a "
          f"warm-up job that filled the shared response cache ({os.environ['EVOMERGE_CACHE']}): both arms read "
          f"every endpoint and probe answer and the IRT fit from it.\n")
    headers = ["preset", "backend", "evaluators", "candidates", "search s", "candidates/min", "speed-up vs local",
               "setup s", "job s", "identical"]
    rows = []
    for preset, r in results.items():
        m = r["metrics"]
        for arm in ("local", "ray"):
            n = 1 if arm == "local" else args.evaluators
            speed = m[arm]["cpm"] / m["local"]["cpm"]
            rows.append([preset, arm, n, m[arm]["candidates"], m[arm]["search_s"], m[arm]["cpm"],
                         f"{speed:.2f}x", m[arm]["setup_s"], r[arm]["job_s"], "yes" if r["identical"] else "no"])
    print(table(headers, rows))
    for preset, r in results.items():
        print(f"{preset}: identical: {'yes' if r['identical'] else 'no'} ({r['why']}); speed-up "
              f"{r['metrics']['ray']['cpm'] / r['metrics']['local']['cpm']:.2f}x (target >= 1.7x with 2 evaluators "
              f"on 2 cores); Ray cluster start {r['ray']['ray_start_s']:.1f} s (outside job s); setup stages "
              + "; ".join(f"{a} " + ", ".join(f"{k} {r[a]['stages'].get(k, 0):.1f} s" for k in STAGES)
                          for a in ("local", "ray")))
        print(f"{preset}: merge + score seconds per candidate inside the evaluator, by generation: "
              + "; ".join(f"{a} " + ", ".join(f"{v:.3f}" for v in r["per_generation_s"][a]) for a in ("local", "ray")))

    print("\nWhat a multi-GPU run would give (model: a step asks B genomes and takes d + ceil(B/N) x t_c on N "
          "evaluators; candidates/min = 60 B / step; d, t_c: the ray arm's generations 2..G):")
    for preset, r in results.items():
        m = r["metrics"]["ray"]
        if "t_c" not in m:
            print(f"{preset}: needs --generations >= 2 for the per-step costs")
            continue
        d, t_c, b = m["d"], m["t_c"], m["batch"]
        loc = r["metrics"]["local"]
        print(f"{preset}: B = {b:g}; t_c = {t_c:.3f} s per candidate per evaluator (driver's clock, dispatch to "
              f"result; {r['in_evaluator_s']['ray']:.3f} s merge + score inside the evaluator; local backend on "
              f"{args.local_threads} threads: {loc.get('t_c', float('nan')):.3f} s); d = {d:.3f} s per step on the driver "
              f"(local: {loc.get('d', float('nan')):.3f} s); first step {m['first_step_s']:.2f} s. "
              f"cost.evaluators' candidate_seconds / candidates = {m['report_s_per_candidate']:.3f} s. Serial share at N = 1: {d / (d + b * t_c):.1%}.")
        base = projected_cpm(d, t_c, b, 1)
        prow = [[n, d + math.ceil(b / n) * t_c, projected_cpm(d, t_c, b, n), f"{projected_cpm(d, t_c, b, n) / base:.2f}x"]
                for n in PROJECT_N]
        print(table(["evaluators", "step s", "candidates/min", "vs 1 evaluator"], prow))
        n = args.evaluators
        print(f"  model check: at N = {n} it predicts {projected_cpm(d, t_c, b, n):.1f} candidates/min against "
              f"{m['cpm']:.1f} measured over the whole search (first step included). With GPUs, t_c is a GPU "
              f"evaluator's own time per candidate (each evaluator on its own GPU does not slow the others, unlike "
              f"CPU cores sharing memory bandwidth); the speed-up column holds while d / t_c stays "
              f"{d / t_c:.2f}; a faster t_c makes d weigh more. No gain past N = B = {b:g} (one NSGA-II "
              f"generation is the batch): the ceiling is {projected_cpm(d, t_c, b, 10**6) / base:.2f}x "
              f"({projected_cpm(d, t_c, b, 10**6):.1f} candidates/min at this t_c).")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine(), "load_before": load_before, "load_after": load_after, "args": {
        k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"},
        "presets": {p: {"identical": r["identical"], "why": r["why"], "metrics": r["metrics"],
                        "in_evaluator_s": r["in_evaluator_s"], "per_generation_s": r["per_generation_s"]}
                    for p, r in results.items()}}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nresults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
