"""Shared helpers of the evolve benchmarks (bench/evolve_*.py, bench/materialize_speed.py).

Not a benchmark itself: the zoo, evolve specs on the zoo's tasks, a Fitness built exactly as
`evolve.run` builds it (endpoints, probes, IRT, subsets), timing and table printing.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))
# share the per-machine response cache (endpoint evaluations) between runs and scripts
os.environ.setdefault("EVOMERGE_CACHE", str(ROOT / ".cache" / "evomerge"))


def search_args(doc: str, generations: int = 6):
    """An argument parser with the options every evolve benchmark shares."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tasks", default="rev,cip,srt")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=generations)
    return ap


def load_zoo(preset: str = "tiny", zoo: Path | None = None) -> tuple[Path, dict]:
    """The zoo of `preset` (built or verified), or, given a folder holding a zoo.json, that zoo as is."""
    import json

    from zoo.build import build_zoo

    if zoo and (Path(zoo) / "zoo.json").is_file():
        return Path(zoo), json.loads((Path(zoo) / "zoo.json").read_text())
    zoo = Path(zoo) if zoo else ROOT / ".cache" / f"zoo-{preset}-seed0"
    manifest = build_zoo(zoo, preset, 0, log=lambda m: print(m, file=sys.stderr))
    return zoo, manifest


def evolve_spec(zoo: Path, manifest: dict, tasks: Sequence[str], *, method: str = "ties",
                space: dict | None = None, estimator: str = "gmp_irt", strategy: str = "entropy",
                size: int = 20, population: int = 8, generations: int = 4, seed: int = 0,
                probes: int = 11, epochs: int = 600, subset_seed: int = 0, final_check: bool = True,
                subset_extra: dict | None = None, fitter: str = "map") -> dict:
    """An evolve job over `tasks`: merge their fine-tunes, one accuracy objective per task.
    `subset_extra`: more subset keys (adaptive: round, prior, stop_sd, min_sd)."""
    search: dict[str, Any] = {"algorithm": "nsga2", "population": population, "generations": generations,
                              "seed": seed}
    if space is not None:
        search["space"] = space
    return {
        "kind": "evolve",
        "base": str(zoo / manifest["models"]["base"]["path"]),
        "models": [{"name": t, "path": str(zoo / manifest["models"][t]["path"])} for t in tasks],
        "method": method,
        "search": search,
        "objectives": [{"benchmark": str(zoo / manifest["benchmarks"][t]["path"]), "name": t,
                        "estimator": estimator, "subset": {"size": size, "strategy": strategy, "seed": subset_seed, **(subset_extra or {})}}
                       for t in tasks],
        "evaluation": {"max_new_tokens": manifest["eval_settings"]["max_new_tokens"],
                       "irt": {"probes": probes, "epochs": epochs, "fitter": fitter}},
        "device": "cpu",
        "final_check": final_check,
    }


class StageClock:
    """An evolve.run callback that timestamps each stage (endpoints, probes, irt, search, final_check)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: list[tuple[str, float]] = []
        self.progress: list[dict] = []

    def __call__(self, event: dict) -> None:
        now = time.perf_counter() - self.t0
        if event.get("type") == "stage":
            self.marks.append((event["stage"], now))
        elif event.get("type") == "progress":
            self.progress.append({**event, "t": now})
        elif event.get("type") == "done":
            self.marks.append(("done", now))

    def seconds(self) -> dict[str, float]:
        """Seconds spent in each stage."""
        out = {}
        for (name, t), (_, t_next) in zip(self.marks, self.marks[1:]):
            out[name] = t_next - t
        return out


def build_fitness(spec: dict):
    """What evolve.run builds before the search, as objects: (fitness, resident, space, cost).

    The same code path as evolve/run.py stages 1-3, so a search driven here scores with the
    same Fitness an evolve job would use."""
    from evolve.run import setup
    from evolve.spec import EvolveSpec

    job = setup(EvolveSpec.model_validate(spec))
    return job.fitness, job.resident, job.space, {k: job.cost[k] for k in ("endpoint_items", "probe_items")}


def forget_setup(spec: dict) -> int:
    """Deletes the cached answers of `spec`'s probe merges and every cached IRT fit, so that its next
    run pays for both as a user's first job over these models does. Returns how many cache files
    were removed."""
    import shutil

    from core.cache import cache_dir
    from data.benchmarks import load_benchmark
    from evolve.run import probe_batches, probe_recipes
    from evolve.spec import EvolveSpec
    from fitness.evaluate import cached_responses_path
    from fitness.fitness import benchmark_paths, eval_settings

    s = EvolveSpec.model_validate(spec)
    settings = eval_settings(s.evaluation)
    benches = [load_benchmark(p) for p in benchmark_paths(s.objectives)]
    removed = 0
    for _, digest in (r for j in range(probe_batches(s)) for r in probe_recipes(s, batch=j)):
        for b in benches:
            f = cached_responses_path(digest, b, settings, s.device)
            removed += f.exists()
            f.unlink(missing_ok=True)
    fits = cache_dir() / "irt"
    removed += len(list(fits.glob("*.json"))) if fits.is_dir() else 0
    shutil.rmtree(fits, ignore_errors=True)
    return removed


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (floats to 3 significant decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def set_threads() -> None:
    """One torch intra-op thread by default (EVOMERGE_BENCH_THREADS overrides): on our 2-core
    machine shared with other jobs, 2 threads made one full evaluation of the tiny zoo's rev
    benchmark take 25 s instead of 0.26 s (OpenMP threads spinning against each other)."""
    import torch

    torch.set_num_threads(int(os.environ.get("EVOMERGE_BENCH_THREADS", "1")))
