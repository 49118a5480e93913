"""How much accuracy does a compressed task-vector store cost? Merges from lowrank and sparse
stores against the same merges from the dense store, on the zoo.

    .venv/bin/python bench/store_accuracy.py [--preset small] [--merges 8] [--methods ties,task_arithmetic]
                                             [--rank 0.1] [--density 0.1]

For each method, `--merges` random parameter sets (the method's search space, seed 0) over
the zoo's full fine-tunes are materialized by one `evolve.materialize.ResidentMerge` per
store (dense: the job's exact float32 task vectors; lowrank at `--rank`; sparse at
`--density`) and evaluated on every task's full benchmark. Printed per store: the store's
bytes as a fraction of dense, the mean and largest |accuracy difference| from dense in
points (over merges x tasks), and the mean accuracy. The peer is the dense store (the
exact merge); the target is a mean difference within 1 point at the default setting.
Results go to bench/out/store_accuracy-<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _evolve_common import load_zoo  # noqa: E402

from data.benchmarks import load_benchmark  # noqa: E402
from evolve.genome import SearchSpace  # noqa: E402
from evolve.materialize import ResidentMerge, store_settings_for  # noqa: E402
from fitness.evaluate import evaluate  # noqa: E402
from zoo.build import eval_settings  # noqa: E402
from zoo.presets import get_preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--zoo", type=Path)
    ap.add_argument("--merges", type=int, default=8)
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--rank", type=float, default=0.1)
    ap.add_argument("--density", type=float, default=0.1)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    zoo, manifest = load_zoo(args.preset, args.zoo)
    full = [n for n, m in manifest["models"].items() if m["kind"] == "full"]
    tasks = [t for t, b in manifest["benchmarks"].items() if "composed_of" not in b]
    benches = {t: load_benchmark(zoo / manifest["benchmarks"][t]["path"], t) for t in tasks}
    settings = eval_settings(get_preset(manifest["preset"]))
    base = zoo / manifest["models"]["base"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    models = [zoo / manifest["models"][n]["path"] for n in full]
    stores = {"dense": store_settings_for(torch.float32, "dense"),
              f"lowrank {args.rank}": store_settings_for(torch.float32, "lowrank", rank=args.rank),
              f"sparse {args.density}": store_settings_for(torch.float32, "sparse", density=args.density)}
    results: dict = {"preset": manifest["preset"], "models": full, "tasks": tasks, "merges": args.merges, "rows": {}}
    for method in args.methods.split(","):
        space = SearchSpace(method, len(models))
        rng = np.random.default_rng(0)
        genomes = [rng.uniform(*space.bounds) for _ in range(args.merges)]
        acc: dict[str, np.ndarray] = {}
        for label, st in stores.items():
            t0 = time.perf_counter()
            rm = ResidentMerge(base, models, method, device="cpu", store=st)
            build = time.perf_counter() - t0
            acc[label] = np.array([[evaluate(rm.materialize(space.params_for_tensor(g)), tokenizer, b, settings,
                                             batch_size=256, device="cpu").accuracy for b in benches.values()]
                                   for g in genomes])
            results["rows"][f"{method} {label}"] = {"bytes": rm.cache_bytes, "build_seconds": build,
                                                     "accuracy": acc[label].tolist()}
            print(f"{method:<16} {label:<14} store {rm.cache_bytes / 1e6:8.2f} MB  built in {build:5.1f}s", file=sys.stderr)
    print(f"{'method':<16} {'store':<14} {'bytes/dense':>11} {'mean |d| pts':>12} {'max |d| pts':>11} {'mean acc':>8}")
    for method in args.methods.split(","):
        dense = results["rows"][f"{method} dense"]
        for label in stores:
            row = results["rows"][f"{method} {label}"]
            d = 100 * np.abs(np.array(row["accuracy"]) - np.array(dense["accuracy"]))
            row.update(mean_diff_points=float(d.mean()), max_diff_points=float(d.max()))
            print(f"{method:<16} {label:<14} {row['bytes'] / dense['bytes']:>11.3f} {d.mean():>12.2f} {d.max():>11.2f} "
                  f"{np.mean(row['accuracy']):>8.3f}")
    out = ROOT / "bench" / "out" / f"store_accuracy-{manifest['preset']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
