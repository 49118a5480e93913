"""End-to-end check on a CUDA machine: a ~1 B-parameter Llama, 3 fine-tunes, a short evolve job through the CLI.

Steps (each timed):
1. models: a random bf16 Llama-shaped base of about --params parameters and --models fine-tunes
   (base + structured low-rank tau + noise, `bench/scale.py`'s `build_family`, generated on the
   GPU when there is one), each folder with the zoo's character-level tokenizer
   (`zoo.tokenizer.build_tokenizer`); reused when present;
2. benchmarks: two multiple-choice JSONL benchmarks of --items items each (sums and reversals
   written in the tokenizer's alphabet; a random model answers them at chance, which is all an
   end-to-end check needs);
3. plan: `evomerge plan SPEC.yaml` (its table is printed) and `evolve.plan.plan_job` for the numbers;
4. job: `evomerge evolve SPEC.yaml --out RUN` run by `service.cli.main` inside a wrapper process that
   prints `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` and its peak RSS at the end
   (a fresh EVOMERGE_CACHE, so endpoints and probes are evaluated as in a user's first job);
5. report: peak GPU memory against the plan's GPU total, seconds per candidate to materialize and
   to score (candidates.jsonl: cost.merge_seconds, cost.score_seconds; the first candidate apart,
   it faults the resident model in), the stages' times, and the final front (front.json).

    bench/gpu_check.sh                 # CUDA, ~1 B parameters, population 4 x 2 generations, 20 items
    bench/gpu_check.sh --cpu           # smoke test on the CPU: a ~5 M parameter model, same steps

Everything is written under bench/out/gpu_check/ (models reused; run folder and cache replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
GB = 10**9

WRAPPER = """
import json, sys, time
import torch
from service.cli import main
try:  # the plan as the job sees it: same process, same free GPU memory, before the job starts
    from evolve.plan import plan_job
    from evolve.spec import EvolveSpec
    from service.client import load_spec_file
    plan = plan_job(EvolveSpec.model_validate(load_spec_file(sys.argv[2])))
    print("GPU_CHECK_PLAN " + json.dumps({"totals": plan.totals, "store": plan.store_kind, "where": plan.store_where,
          "dtype": plan.dtype, "batch": plan.batch_size, "seq": plan.seq_len, "moved": plan.moved, "fits": plan.fits,
          "error": str(plan.error) if plan.error else None,
          "components": {c.name: c.bytes for c in plan.components}}), flush=True)
except ImportError:
    pass
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
peak = {"rc": rc, "wall_s": wall}
if torch.cuda.is_available():
    peak |= {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
             "device_name": torch.cuda.get_device_name(), "device_total": torch.cuda.get_device_properties(0).total_memory}
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak["host_peak_rss"] = int(line.split()[1]) * 1024
print("GPU_CHECK_PEAK " + json.dumps(peak), flush=True)
sys.exit(rc)
"""


def write_benchmarks(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Two multiple-choice benchmarks in the zoo tokenizer's alphabet: sums and reversals."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    add, rev = [], []
    for k in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = rng.sample([a + b + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)], 3)
        choices = [str(a + b), *map(str, wrong)]
        rng.shuffle(choices)
        add.append({"id": f"add{k}", "prompt": f"{a}+{b}=", "choices": choices, "answer": choices.index(str(a + b))})
        word = "".join(rng.choice("abcdefghij") for _ in range(5))
        opts = [word[::-1], word, word[1:] + word[0], word[::-1][1:] + word[-1]]
        opts = list(dict.fromkeys(opts))  # distinct choices
        right = opts[0]
        rng.shuffle(opts)
        rev.append({"id": f"rev{k}", "prompt": f"rev:{word}=", "choices": opts, "answer": opts.index(right)})
    paths = []
    for name, items in (("add", add), ("rev", rev)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(it) + "\n" for it in items))
        paths.append(p)
    return paths


def write_spec(path: Path, base: Path, fts: list[Path], benches: list[Path], args, device: str) -> dict:
    import yaml

    spec = {
        "kind": "evolve", "base": str(base), "method": args.method, "device": device,
        "models": [{"name": f"ft{i}", "path": str(p)} for i, p in enumerate(fts)],
        "search": {"algorithm": "nsga2", "population": args.population, "generations": args.generations, "seed": 0},
        "objectives": [{"benchmark": str(b), "name": b.stem, "subset": {"size": args.subset}} for b in benches],
        "evaluation": {"batch_size": args.batch_size, "max_new_tokens": 4, "irt": {"probes": args.probes}},
        "final_check": True,
    }
    if args.store:
        spec["evaluation"]["store"] = args.store
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU with a tiny model (smoke test)")
    ap.add_argument("--params", type=float, help="model size (default 1e9 on CUDA, 5e6 with --cpu)")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--items", type=int, default=20, help="items per benchmark (two benchmarks)")
    ap.add_argument("--subset", type=int, default=10, help="items per benchmark a candidate answers")
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--store", help="evaluation.store (default: the spec's default, auto)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--build-only", help=argparse.SUPPRESS)
    ap.add_argument("--limit-minutes", type=float, default=8.0, help="the time the whole check should take")
    args = ap.parse_args()
    t_start = time.perf_counter()
    marks: dict[str, float] = {}

    if args.build_only:  # in a child process, so that the check's own process holds no GPU memory
        from scale import build_family

        from zoo.tokenizer import build_tokenizer

        tok = build_tokenizer()
        build_family(args.out / "models", args.params, args.models, log=print, device=args.build_only,
                     extra_files=lambda folder: tok.save_pretrained(folder))
        return 0

    import torch

    cuda = torch.cuda.is_available() and not args.cpu  # (no CUDA context is made in this process)
    if not cuda and not args.cpu:
        print("gpu_check: no CUDA device here; run with --cpu for the CPU smoke test", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    params = args.params or (1e9 if cuda else 5e6)
    print(f"gpu_check: device {device}, ~{params / 1e9:.2f} B parameters, {args.models} fine-tunes, "
          f"{args.method}, population {args.population} x {args.generations} generations, {args.items} items x 2 "
          f"benchmarks (subset {args.subset}), {args.probes} probes", flush=True)

    from scale import build_family, llama_shape

    from zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    if llama_shape(params)["vocab_size"] < len(tok):
        raise SystemExit(f"--params {params:g} gives a vocabulary smaller than the tokenizer's {len(tok)}")

    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-only", device, "--params", str(params), "--models",
                    str(args.models), "--out", str(args.out)], check=True)
    base, fts, shape = build_family(args.out / "models", params, args.models)  # built: only the paths
    marks["models (build or reuse)"] = time.perf_counter() - t
    benches = write_benchmarks(args.out / "benchmarks", args.items)
    spec_path = args.out / "spec.yaml"
    write_spec(spec_path, base, fts, benches, args, device)
    run_dir, cache = args.out / "run", args.out / "cache"
    for d in (run_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    env = dict(os.environ, EVOMERGE_CACHE=str(cache), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")

    # the plan through the CLI (its table); its numbers come from the job's own process (WRAPPER)
    t = time.perf_counter()
    cli = [sys.executable, "-m", "service.cli"]
    r = subprocess.run([*cli, "plan", str(spec_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"\n$ evomerge plan {spec_path.relative_to(ROOT)}  (exit {r.returncode})\n{r.stdout}{r.stderr}", flush=True)
    marks["plan"] = time.perf_counter() - t

    # the job, through the CLI's main in a wrapper that reports peak memory
    t = time.perf_counter()
    cmd = [sys.executable, "-c", WRAPPER, "evolve", str(spec_path), "--out", str(run_dir)]
    print(f"$ evomerge evolve {spec_path.relative_to(ROOT)} --out {run_dir.relative_to(ROOT)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, plan, tail = None, None, []
    for line in proc.stdout:
        if line.startswith("GPU_CHECK_PEAK "):
            peak = json.loads(line.split(" ", 1)[1])
            continue
        if line.startswith("GPU_CHECK_PLAN "):
            plan = json.loads(line.split(" ", 1)[1])
            continue
        tail.append(line)
        if line.startswith("[") or line.strip().startswith("gen ") or "error" in line.lower():
            print("  " + line.rstrip(), flush=True)  # stages, progress, errors
    rc = proc.wait()
    marks["evolve job"] = time.perf_counter() - t
    if rc != 0 or peak is None:
        print("".join(tail[-60:]))
        print(f"gpu_check: FAILED: evolve exited {rc}", file=sys.stderr)
        return 1

    cands = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines() if line.strip()]
    front = json.loads((run_dir / "front.json").read_text())
    merge_s = [c["cost"]["merge_seconds"] for c in cands if "merge_seconds" in c.get("cost", {})]
    score_s = [c["cost"]["score_seconds"] for c in cands if "score_seconds" in c.get("cost", {})]

    def stats(xs: list[float]) -> str:
        if not xs:
            return "-"
        rest = xs[1:] or xs
        return f"first {xs[0]:.2f}, then mean {statistics.mean(rest):.2f} (median {statistics.median(rest):.2f}, n={len(rest)})"

    total = time.perf_counter() - t_start
    from merging.checkpoint import CheckpointReader

    reader = CheckpointReader(base)
    n_params = sum(reader.info(n).numel for n in reader.names())
    rows = [("model", f"{n_params / 1e9:.3f} B parameters (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
                      f"layers, vocab {shape['vocab_size']}), {args.models} fine-tunes, {args.method}")]
    if cuda:
        rows.append(("GPU", f"{peak['device_name']}, {peak['device_total'] / GB:.1f} GB"))
    if plan is not None:
        rows.append(("plan", f"store {plan['store']} on {plan['where']}, dtype {plan['dtype']}, batch {plan['batch']} x "
                             f"L {plan['seq']}, fits: {'yes' if plan['fits'] else 'no: ' + str(plan['error'])}"))
        rows.append(("plan components", ", ".join(f"{k} {v / GB:.2f}" for k, v in plan["components"].items() if v)
                     + " (GB)"))
    if cuda:
        alloc, reserved = peak["max_allocated"], peak["max_reserved"]
        line = f"{alloc / GB:.2f} GB allocated, {reserved / GB:.2f} GB reserved (torch.cuda.max_memory_*)"
        if plan is not None and plan["totals"]["gpu"]:
            line += (f"; plan GPU total {plan['totals']['gpu'] / GB:.2f} GB: allocated / plan = "
                     f"{alloc / plan['totals']['gpu']:.2f}, reserved / plan = {reserved / plan['totals']['gpu']:.2f}")
        rows.append(("peak GPU memory", line))
    host_line = f"{peak['host_peak_rss'] / GB:.2f} GB (VmHWM of the job's process, imports included)"
    if plan is not None:
        host_line += f"; plan host total {plan['totals']['host'] / GB:.2f} GB"
    rows.append(("peak host memory", host_line))
    rows.append(("candidates", f"{len(cands)} scored ({args.population} x {args.generations})"))
    rows.append(("materialize s / candidate", stats(merge_s)))
    rows.append(("score s / candidate", stats(score_s)))
    if plan is not None and merge_s[1:]:
        moved = sum(plan["moved"].values())
        rows.append(("moved per candidate (plan)", f"{moved / GB:.2f} GB "
                                                   f"({', '.join(f'{k} {v / GB:.2f}' for k, v in plan['moved'].items() if v)}): "
                                                   f"{moved / GB / statistics.mean(merge_s[1:]):.2f} GB/s achieved"))
    rows.append(("hypervolume", f"search {front.get('hypervolume')}, true (final check) {front.get('true_hypervolume')}"))
    for k, v in marks.items():
        rows.append((f"time: {k}", f"{v:.1f} s"))
    rows.append(("time: total", f"{total:.1f} s ({total / 60:.1f} min; limit {args.limit_minutes:g} min: "
                                f"{'within' if total <= args.limit_minutes * 60 else 'OVER'})"))
    width = max(len(k) for k, _ in rows)
    print("\n== gpu_check ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    names = [o["name"] for o in front["objectives"]]
    print(f"\nfinal front ({len(front['front'])} candidates; objectives {', '.join(names)}; estimate / full-benchmark value):")
    print(f"  {'id':>3}  {'knee':>4}  " + "  ".join(f"{n:>17}" for n in names) + "  params")
    for e in front["front"]:
        vals = "  ".join(f"{e['objectives'][n]:>7.3f} / {(e['true_objectives'] or {}).get(n, float('nan')):>7.3f}"
                         for n in names)
        p = e["params"][0] if isinstance(e["params"], list) and len(e["params"]) == 1 else e["params"]
        p = {k: ([round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) if isinstance(v, float) else v)
             for k, v in p.items()} if isinstance(p, dict) else p
        print(f"  {e['id']:>3}  {'*' if e['knee'] else '':>4}  {vals}  {json.dumps(p)}")
    summary = {"device": device, "params": n_params, "peak": peak, "marks": marks, "total_s": total,
               "merge_seconds": merge_s, "score_seconds": score_s, "plan": plan, "front": front["front"]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0 if total <= args.limit_minutes * 60 or args.cpu else 3


if __name__ == "__main__":
    sys.exit(main())
