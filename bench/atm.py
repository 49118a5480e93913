"""ATM against one-shot merges on the zoo, at equal total training steps.

    .venv/bin/python bench/atm.py [--zoo DIR] [--iterations 1,2,4,8] [--tasks rev,cip,...] [--methods ...]

Uses the `small` zoo when `.cache/zoo-small-seed0/zoo.json` exists, the tiny one otherwise
(or `--zoo`). The one-shot rows merge the zoo's full fine-tunes (each trained for the
preset's steps: 800 for `rev`, 400 for the others in `tiny`) at default parameters. Each
ATM row gives every task the same number of training steps as its zoo fine-tune
(`total_steps`, split evenly over T iterations), the same training pairs
(`zoo.train_data`: the fine-tune's own task stream, never a benchmark prompt, without
the zoo's replay by default, `--replay`) and the zoo's
fine-tuning recipe per iteration (AdamW lr `lr_finetune`, warmup 5% and cosine decay,
clip 1, batch 32), merged by task arithmetic with ATM's default alpha = 1/n (the mean of
the task vectors, as in the authors' code) or `--alpha` (1: the sum, as task arithmetic
with lambda 1). T = 1 is "fine-tune, then task arithmetic with lambda = alpha".

Columns as in the paper's tables: accuracy per task, the average absolute accuracy, and
the normalized accuracy (merged accuracy / the fine-tune's accuracy on its own task,
averaged over tasks). `train s` is training time: the zoo manifest's fine-tuning seconds
for the one-shot rows (all fine-tunes together), ATM's own training + merging time for
its rows (measured now, on a shared machine: compare within one run only).
Results also go to bench/out/atm-<preset>-seed<seed>.json.
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

import torch  # noqa: E402

from data.benchmarks import load_benchmark  # noqa: E402
from fitness.evaluate import evaluate_folder  # noqa: E402
from zoo.build import eval_settings  # noqa: E402
from zoo.presets import get_preset  # noqa: E402
from zoo.train_data import write_train_data  # noqa: E402


def default_zoo() -> Path:
    small = ROOT / ".cache" / "zoo-small-seed0"
    return small if (small / "zoo.json").is_file() else ROOT / ".cache" / "zoo-tiny-seed0"


def atm_params(preset, tasks: list[str], iterations: int, alpha: float | None = None) -> dict:
    """ATM with the zoo's fine-tuning recipe and each task's zoo budget, split over `iterations`."""
    return {"iterations": iterations, "alpha": alpha, "total_steps": [preset.steps_for(t) for t in tasks], "lr": preset.lr_finetune,
            "schedule": "cosine", "warmup": 0.05, "clip": 1.0, "batch_size": preset.batch_size, "seed": 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--iterations", default="1,2,4,8")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: all the zoo's tasks)")
    ap.add_argument("--methods", default="task_arithmetic,ties,tsv")
    ap.add_argument("--replay", type=float, default=0.0,
                    help="share of base-corpus replay in ATM's data (0: the task alone; see zoo/train_data.py)")
    ap.add_argument("--alpha", type=float, default=None, help="ATM's alpha (default: 1/n, the authors' mean)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "atm")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from merging import merge

    zoo = args.zoo or default_zoo()
    manifest = json.loads((zoo / "zoo.json").read_text())
    preset = get_preset(manifest["preset"])
    tasks = args.tasks.split(",") if args.tasks else list(preset.tasks)
    settings = eval_settings(preset)
    benches = {t: load_benchmark(zoo / manifest["benchmarks"][t]["path"], t) for t in tasks}
    own = {t: manifest["accuracy"][t][t] for t in tasks}
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    data = write_train_data(work / "data", preset, manifest["seed"], tasks, replay=args.replay)
    base = str(zoo / "models" / "base")
    print(f"zoo {zoo.name} ({preset.name}), tasks {', '.join(tasks)}; steps per task "
          + ", ".join(f"{t} {preset.steps_for(t)}" for t in tasks), flush=True)

    def evaluate(folder: Path) -> dict[str, float]:
        return {t: evaluate_folder(folder, b, settings, batch_size=256, device="cpu").accuracy for t, b in benches.items()}

    rows: dict[str, dict] = {}
    ft_seconds = sum(manifest["models"][t]["train_seconds"] for t in tasks)
    rows["base"] = {"acc": evaluate(Path(base)), "train_s": None}
    for method in args.methods.split(","):
        out = work / method
        merge({"base": base, "method": method, "params": {}, "device": "cpu",
               "models": [{"name": t, "path": str(zoo / "models" / t)} for t in tasks]}, out, progress=False)
        rows[method] = {"acc": evaluate(out), "train_s": ft_seconds}
        print(f"{method}: done", flush=True)
    for T in [int(x) for x in args.iterations.split(",")]:
        out = work / f"atm-T{T}"
        t0 = time.perf_counter()
        merge({"base": base, "method": "atm", "params": atm_params(preset, tasks, T, args.alpha), "device": "cpu",
               "models": [{"name": t, "train": str(data[t])} for t in tasks]}, out, progress=False)
        wall = time.perf_counter() - t0
        info = json.loads((out / "atm.json").read_text())
        rows[f"atm T={T}" + ("" if args.alpha is None else f" alpha={args.alpha:g}")] = {"acc": evaluate(out), "train_s": round(info["train_seconds"] + info["merge_seconds"], 1),
                              "wall_s": round(wall, 1)}
        print(f"atm T={T}: done in {wall:.0f}s", flush=True)

    print(f"\n| model | {' | '.join(tasks)} | avg | norm | train s |")
    print("|" + " --- |" * (len(tasks) + 4))
    for name, r in rows.items():
        acc = r["acc"]
        avg = sum(acc.values()) / len(acc)
        norm = sum(acc[t] / own[t] for t in tasks) / len(tasks)
        r["avg"], r["norm"] = avg, norm
        ts = "" if r["train_s"] is None else f"{r['train_s']:.1f}"
        print(f"| {name} | " + " | ".join(f"{acc[t]:.3f}" for t in tasks) + f" | {avg:.3f} | {norm:.3f} | {ts} |")
    print("| fine-tunes (own task) | " + " | ".join(f"{own[t]:.3f}" for t in tasks)
          + f" | {sum(own.values()) / len(own):.3f} | 1.000 | {ft_seconds:.1f} |")
    tag = "" if args.alpha is None else f"-alpha{args.alpha:g}"
    out_json = ROOT / "bench" / "out" / f"atm-{preset.name}-seed{manifest['seed']}{tag}.json"
    out_json.write_text(json.dumps({"zoo": str(zoo), "tasks": tasks, "rows": rows, "own": own}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
