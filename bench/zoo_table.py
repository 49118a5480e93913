"""Prints the zoo's accuracy table: models (base, fine-tunes, adapters, merges) x tasks.

    .venv/bin/python bench/zoo_table.py [--zoo DIR] [--preset tiny] [--seed 0] [--methods ties,tsv]

Builds the zoo first (or reuses it after checking hashes), merges the full fine-tunes
with every registered merge method at its default parameters into `<zoo>/merges/`, and
evaluates each merge on every benchmark through the response cache. Columns: one per
task, then `avg` (mean accuracy over tasks) and `norm` (mean over tasks of the
accuracy divided by that task's fine-tune's accuracy on it, so 1.0 means every task
is solved as well as its specialist does). Composed benchmarks (`cip_rev`: the
transfer test of `zoo.tasks.compose`) are columns after those two and out of both
averages; for each, every method also merges just the two parents (rows
`merge:<method>[cip+rev]`), as MERGE^3 merges a math and a language model. The table is
also written as JSON to bench/out/zoo_table-<preset>-seed<seed>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.benchmarks import load_benchmark  # noqa: E402
from fitness.evaluate import evaluate_folder  # noqa: E402
from zoo.build import build_zoo, eval_settings  # noqa: E402
from zoo.presets import get_preset  # noqa: E402


def merge_rows(zoo: Path, manifest: dict, methods: list[str], log) -> dict[str, dict]:
    """Accuracy per task of default-parameter merges, per method: of all full fine-tunes, and of each composed pair."""
    from merging import merge

    full = [n for n, m in manifest["models"].items() if m["kind"] == "full"]
    groups = {"": full} | {f"[{'+'.join(b['composed_of'])}]": b["composed_of"]
                           for b in manifest["benchmarks"].values() if "composed_of" in b}
    settings = eval_settings(get_preset(manifest["preset"]))
    benches = {t: load_benchmark(zoo / b["path"], t) for t, b in manifest["benchmarks"].items()}
    rows = {}
    for suffix, members in groups.items():
        for method in methods:
            out = zoo / "merges" / f"{method}{suffix}"
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            merge({"base": str(zoo / "models" / "base"), "method": method, "params": {},
                   "models": [{"name": n, "path": str(zoo / manifest["models"][n]["path"])} for n in members]},
                  out, progress=False)
            seconds = time.perf_counter() - t0
            rows[f"merge:{method}{suffix}"] = {t: evaluate_folder(out, b, settings, batch_size=256, device="cpu").accuracy
                                               for t, b in benches.items()}
            log(f"merged and evaluated {method}{suffix} ({seconds:.1f}s merge)")
    return rows


def table(manifest: dict, rows: dict[str, dict]) -> str:
    tasks = [t for t, b in manifest["benchmarks"].items() if "composed_of" not in b]
    transfer = [t for t, b in manifest["benchmarks"].items() if "composed_of" in b]
    specialist = {m["task"]: manifest["accuracy"][n][m["task"]] for n, m in manifest["models"].items() if m["kind"] == "full"}
    width = max(len(r) for r in rows) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{t:>7}" for t in tasks) + f"{'avg':>7}{'norm':>7}"
             + "".join(f"{t:>9}" for t in transfer)]
    for name, acc in rows.items():
        avg = sum(acc[t] for t in tasks) / len(tasks)
        norm = sum(acc[t] / specialist[t] for t in tasks) / len(tasks)
        lines.append(f"{name:<{width}}" + "".join(f"{acc[t]:>7.3f}" for t in tasks) + f"{avg:>7.3f}{norm:>7.3f}"
                     + "".join(f"{acc[t]:>9.3f}" for t in transfer))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zoo", type=Path, help="zoo folder (default .cache/zoo-<preset>-seed<seed>)")
    ap.add_argument("--methods", help="comma-separated merge methods (default: every registered method)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # on 2 shared cores, two torch threads stall on each other
    zoo = args.zoo or ROOT / ".cache" / f"zoo-{args.preset}-seed{args.seed}"
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    manifest = build_zoo(zoo, args.preset, args.seed, log=log, strict=False)
    rows = {name: manifest["accuracy"][name] for name in manifest["models"]}
    try:
        from merging import METHODS
    except ImportError:
        log("merging is not importable: no merge rows")
    else:
        methods = args.methods.split(",") if args.methods else sorted(METHODS)
        rows.update(merge_rows(zoo, manifest, methods, log))
    print(f"zoo {zoo} (preset {args.preset}, seed {args.seed}); accuracy on each task's benchmark")
    print(table(manifest, rows))
    out = ROOT / "bench" / "out" / f"zoo_table-{args.preset}-seed{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"zoo": str(zoo), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
