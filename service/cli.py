"""`evomerge` command line: merge, evolve, plan, export, zoo, demo, methods, and the service commands."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from service.client import load_spec_file


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def cmd_merge(args) -> None:
    from merging import MergeSpec, merge

    data = load_spec_file(args.spec)
    if args.device:
        data["device"] = args.device
    spec = MergeSpec.model_validate(data)
    out = merge(spec, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(out)


class ProgressPrinter:
    """One line per stage and per generation on stderr (a progress bar for the search)."""

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "stage":
            print(f"[{event['stage']}]", file=sys.stderr, flush=True)
        elif kind == "progress":
            best = ", ".join(f"{k}={v:.4g}" for k, v in event["best"].items())
            eta = event.get("eta_seconds")
            done, total = event["generation"], event["generations"]
            bar = "#" * int(20 * done / total) + "." * (20 - int(20 * done / total))
            print(f"  gen {done}/{total} [{bar}] evals {event['evaluations']}  best {best}  "
                  f"HV {event['hypervolume']:.4g}" + (f"  ETA {eta:.0f}s" if eta is not None else ""),
                  file=sys.stderr, flush=True)


def cmd_evolve(args) -> None:
    import json

    from core.hooks import Hooks
    from evolve import EvolveSpec, run

    data = load_spec_file(args.spec)
    if args.device:
        data["device"] = args.device
    spec = EvolveSpec.model_validate(data)
    result = run(spec, args.out, hooks=Hooks(None if args.quiet else ProgressPrinter()), resume=args.resume,
                 overwrite=args.overwrite)
    print(json.dumps({"out": str(result.out_dir), "front": result.front, "knee": result.knee,
                      "hypervolume": result.hypervolume, "true_hypervolume": result.true_hypervolume,
                      "cost": result.cost}, indent=2))


class DoesNotFit(Exception):
    """`evomerge plan`: the job does not fit (exit 1, its one line on stderr)."""


def cmd_plan(args) -> None:
    from evolve import EvolveSpec
    from evolve.plan import plan_job

    data = load_spec_file(args.spec)
    if args.device:
        data["device"] = args.device
    if data.get("kind", "evolve") != "evolve":
        raise ValueError(f"kind: evomerge plan plans evolve jobs, not {data.get('kind')!r} (a merge streams one tensor at a time)")
    plan = plan_job(EvolveSpec.model_validate(data), args.gpu_memory, args.host_memory)
    print(plan.table())
    if not plan.fits:
        raise DoesNotFit(str(plan.error))


def cmd_export(args) -> None:
    from evolve import export

    print(export(args.run, args.candidate, args.out, overwrite=args.overwrite, progress=not args.quiet))


def cmd_zoo_build(args) -> None:
    from zoo.build import build_zoo

    if args.workers is not None and args.workers < 1:
        raise SystemExit("evomerge zoo build: --workers must be at least 1")
    build_zoo(Path(args.out), preset=args.preset, seed=args.seed, workers=args.workers,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    print(Path(args.out) / "zoo.json")


def cmd_demo(args) -> None:
    from service.demo import run_demo

    run_demo(Path(args.out), population=args.population, generations=args.generations,
             log=lambda m: print(m, flush=True))


def cmd_compress(args) -> None:
    from merging.compress import compress

    report = compress(args.base, args.model, args.out, args.fraction, device=args.device or "auto",
                      overwrite=args.overwrite)
    worst = min(report["per_matrix"].items(), key=lambda kv: kv[1], default=("-", 1.0))
    print(f"{report['out']}: kept {100 * report['kept_energy']:.2f}% of the task vector's energy at rank "
          f"fraction {args.fraction} (lowest: {worst[0]} {100 * worst[1]:.2f}%)")


def cmd_methods(args) -> None:
    from merging.methods import methods

    for kind, title in (("tensor", "per-tensor methods (merge, evolve)"),
                        ("model", "whole-model methods (merge only; align, then average; base optional)"),
                        ("training", "training methods (merge only; models give `train` data)")):
        print(f"{title}:")
        for name, m in sorted(methods(kind).items()):
            fields = ", ".join(f.alias or k for k, f in m.params.model_fields.items())
            print(f"  {name:16} {m.summary}  params: {fields}")


def _duration(text: str) -> float:
    """`"30d"`, `"12h"`, `"90m"`, `"45s"` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30d, 12h, 90m or 45s")
    return float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]


def _size(text: str) -> int:
    from core.errors import CheckpointError
    from merging.checkpoint import parse_size

    try:
        return parse_size(text)
    except CheckpointError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 10GB or 500MiB") from None


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def cmd_cache(args) -> None:
    import time

    from core.cache import SECTIONS, cache_dir, entries, remove, select

    root = cache_dir()
    found = entries(root)
    if args.cache_command == "info":
        now = time.time()
        print(f"{root}: {len(found)} entries, {_human(sum(e.bytes for e in found))}")
        for section in SECTIONS:
            mine = [e for e in found if e.section == section]
            if mine:
                idle = (now - min(e.last_used for e in mine)) / 86400
                print(f"  {section:10} {len(mine):6} entries {_human(sum(e.bytes for e in mine)):>10}  "
                      f"least recently used {idle:.1f} days ago")
        return
    if args.older_than is None and args.max_size is None:
        raise ValueError("cache prune: give --older-than and/or --max-size")
    chosen = select(found, older_than=args.older_than, max_bytes=args.max_size, keep_recent=args.keep_recent)
    size = sum(e.bytes for e in chosen)
    if args.dry_run:
        for e in chosen:
            print(f"  would remove {e.section}/{e.path.name} ({_human(e.bytes)})")
        print(f"{root}: would remove {len(chosen)} of {len(found)} entries, {_human(size)}")
        return
    freed = remove(chosen)
    print(f"{root}: removed {len(chosen)} of {len(found)} entries, {_human(freed)} freed")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model merging on one GPU.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models as a spec of kind: merge says")
    p.add_argument("spec", help="YAML job spec (kind: merge)")
    p.add_argument("--out", required=True, help="output HF model folder (must not exist)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the spec)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("evolve", help="search merge parameters for a Pareto front (kind: evolve)")
    p.add_argument("spec", help="YAML job spec (kind: evolve)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, candidates.jsonl, front.json, front.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the spec)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser("plan", help="the memory plan of an evolve job: bytes of each component and where it "
                                    "lives; exit 1 when it does not fit")
    p.add_argument("spec", help="YAML job spec (kind: evolve)")
    p.add_argument("--gpu-memory", type=_size, help="plan for a GPU of this size, e.g. 24GB (default: the free "
                                                    "memory of this machine's GPU, when the job runs on cuda)")
    p.add_argument("--host-memory", type=_size, help="host memory to plan for, e.g. 32GB (default: MemAvailable)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the spec)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write one candidate of an evolve run as a HF model folder")
    p.add_argument("run", help="the evolve run folder")
    p.add_argument("--candidate", type=int, required=True, help="candidate id (see front.json)")
    p.add_argument("--out", required=True, help="output HF model folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("zoo", help="the project's small real models and benchmarks")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    z = zsub.add_parser("build", help="build (or verify and reuse) a zoo")
    z.add_argument("--out", required=True)
    z.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--workers", type=int, default=None,
                   help="processes training fine-tunes side by side (default: one per core, at most 4; weights do not depend on it)")
    z.set_defaults(func=cmd_zoo_build)

    p = sub.add_parser("demo", help="build the tiny zoo, run an evolve job through the service, download the knee")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compress", help="TSV-C: keep a fraction of each task-vector matrix's singular triplets")
    p.add_argument("--base", required=True)
    p.add_argument("--model", required=True, help="fine-tuned folder or LoRA adapter of the base")
    p.add_argument("--fraction", type=float, default=0.1, help="kept fraction of each matrix's rank")
    p.add_argument("--out", required=True)
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("cache", help="the per-machine cache ($EVOMERGE_CACHE): sizes, and pruning")
    csub = p.add_subparsers(dest="cache_command", required=True)
    c = csub.add_parser("info", help="entries and sizes per section (endpoints, responses, irt, hashes)")
    c.set_defaults(func=cmd_cache)
    c = csub.add_parser("prune", help="remove entries unused for a while, or the least recently used beyond a size "
                                      "(every entry is recomputed when needed again)")
    c.add_argument("--older-than", type=_duration, help="remove entries unused for longer, e.g. 30d")
    c.add_argument("--max-size", type=_size, help="then remove the least recently used until the cache fits, e.g. 10GB")
    c.add_argument("--keep-recent", type=_duration, default=3600.0,
                   help="never remove an entry used this recently (default 1h: a job starting now keeps its inputs)")
    c.add_argument("--dry-run", action="store_true", help="list what would be removed")
    c.set_defaults(func=cmd_cache)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=cmd_methods)

    from service.client import add_commands

    add_commands(sub)  # serve, worker, submit, status, cancel, download, benchmark
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like ^C (cleanup on the way out) but reported as 128 + 15."""


def _interrupt(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.errors import CheckpointError

    if args.func in (cmd_merge, cmd_evolve, cmd_export):  # SIGTERM (timeout, docker, systemd) cleans up like ^C
        import signal

        signal.signal(signal.SIGTERM, _interrupt)

    try:
        args.func(args)
    except DoesNotFit as e:
        print(f"evomerge: does not fit: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"evomerge: error: invalid spec: {format_validation_error(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as e:
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"evomerge: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
