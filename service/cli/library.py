"""The library commands: what runs on this machine, in this process, without the service:
merge, evolve, plan, export, zoo build, compress, cache, methods and irt (leaderboard item parameters)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from core.validation import strict_spec
from service.client import load_spec_file


def cmd_merge(args) -> None:
    from merging import MergeSpec, merge

    data = load_spec_file(args.spec)
    if args.device:
        data["device"] = args.device
    if "merge_method" in data:  # a mergekit config
        from merging.mergekit import merge_mergekit

        out, notes = merge_mergekit(data, args.out, overwrite=args.overwrite, progress=not args.quiet,
                                    threads=args.threads)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(out)
        return
    spec = strict_spec(MergeSpec, data)
    out = merge(spec, args.out, overwrite=args.overwrite, progress=not args.quiet, threads=args.threads)
    print(out)


def fitness_line(info: dict) -> str:
    """How a job scores one benchmark, from `Fitness.describe()`'s entry: the subset and, for
    `estimator: auto`, what it chose and the leave-one-out errors it chose by."""
    auto = info.get("auto")
    if auto is None:
        return f"{info['strategy']} subset, {info['subset']} items"
    if auto["estimator"] == "blend_irt":
        chosen = f"blend_irt on {info['subset']} fixed random items"
    else:
        line = auto["line"]
        chosen = f"p_irt on {info['subset']} adaptive items" + (
            f", mapped by {line['intercept']:.3f} + {line['slope']:.2f} x" if line else "")
    errors = ", ".join(f"{name} {100 * v:.1f}" for name, v in auto["loo_mae"].items())
    return f"{chosen} (auto; leave-one-out error on {auto['rows']} probes, points: {errors})"


def stage_name(event: dict) -> str:
    """A stage event's name, with the probe batch after the first (fitness.probes)."""
    return event["stage"] + (f", batch {event['batch']}" if event.get("batch") else "")


class ProgressPrinter:
    """One line per stage, per benchmark's fitness and per generation on stderr (a progress bar
    for the search)."""

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "stage":
            print(f"[{stage_name(event)}]", file=sys.stderr, flush=True)
        elif kind == "irt":
            if "probes" in event:
                print(f"  probes: {event['probes']}", file=sys.stderr, flush=True)
            for bench, info in event["benchmarks"].items():
                print(f"  {Path(bench).name}: {fitness_line(info)}", file=sys.stderr, flush=True)
        elif kind == "progress":
            best = ", ".join(f"{k}={v:.4g}" for k, v in event["best"].items())
            eta = event.get("eta_seconds")
            done, total = event["generation"], event["generations"]
            bar = "#" * int(20 * done / total) + "." * (20 - int(20 * done / total))
            print(f"  gen {done}/{total} [{bar}] evals {event['evaluations']}  best {best}  "
                  f"HV {event['hypervolume']:.4g}" + (f"  ETA {eta:.0f}s" if eta is not None else ""),
                  file=sys.stderr, flush=True)


def cmd_evolve(args) -> None:
    from core.hooks import Hooks
    from evolve import EvolveSpec, run

    data = load_spec_file(args.spec)
    if args.device:
        data["device"] = args.device
    spec = strict_spec(EvolveSpec, data)
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
        raise ValueError(f"kind: evomerge plan plans evolve jobs, not {data.get('kind')!r} "
                         "(a merge streams one tensor at a time)")
    plan = plan_job(strict_spec(EvolveSpec, data), args.gpu_memory, args.host_memory)
    print(plan.table())
    if not plan.fits:
        raise DoesNotFit(str(plan.error))


def cmd_export(args) -> None:
    from evolve import export

    if args.out is None and args.mergekit_yaml is None:
        raise SystemExit("evomerge export: give --out DIR (a HF folder), --mergekit-yaml FILE, or both")
    if args.mergekit_yaml:
        import yaml

        from core.fs import atomic_write
        from evolve.run import export_mergekit

        atomic_write(Path(args.mergekit_yaml), yaml.safe_dump(export_mergekit(args.run, args.candidate),
                                                              sort_keys=False))
        print(args.mergekit_yaml)
    if args.out:
        print(export(args.run, args.candidate, args.out, overwrite=args.overwrite, progress=not args.quiet))


def cmd_zoo_build(args) -> None:
    from zoo.build import build_zoo

    if args.workers is not None and args.workers < 1:
        raise SystemExit("evomerge zoo build: --workers must be at least 1")
    build_zoo(Path(args.out), preset=args.preset, seed=args.seed, workers=args.workers,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    print(Path(args.out) / "zoo.json")


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


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def cmd_cache(args) -> None:
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


def _irt_benchmark(ref: str):
    """`--benchmark`: a JSONL file, or the name of a benchmark uploaded to this machine's service
    (its store: $EVOMERGE_DB, or the SQLite file in $EVOMERGE_ARTIFACTS)."""
    from core.errors import FieldError
    from data.benchmarks import load_benchmark

    if Path(ref).is_file():
        return load_benchmark(ref)
    from service.config import Settings

    settings = Settings.from_env()
    if settings.db_url or (settings.artifacts / "evomerge.db").is_file():
        from service.store import Store

        store = Store(settings.database_url)
        try:
            row = store.get_benchmark(ref)
        finally:
            store.close()
        if row is not None:
            return load_benchmark(row.path, name=ref)
    raise FieldError("benchmark", f"{ref!r} is neither a JSONL file nor a benchmark uploaded to the service "
                                  f"(artifacts {settings.artifacts})")


def _entry_line(e) -> str:
    m = e.meta
    rows = f"{m.get('rows', 0)} rows" if m.get("rows") else "rows unknown"
    return (f"{m.get('benchmark', '?')}  {str(m.get('benchmark_hash', ''))[:12]}  {m.get('items', '?')} items  "
            f"{m.get('source', '?')} ({rows})  {m.get('model', '?')}  {m.get('created_at', '')}  {e.id}")


def cmd_irt(args) -> None:
    """`evomerge irt fit|import|list`: item parameters per benchmark (fitness.params_store)."""
    from fitness import params_store

    if args.irt_command == "list":
        found = params_store.entries()
        if args.benchmark:
            bench = _irt_benchmark(args.benchmark)
            found = [e for e in found if e.meta.get("benchmark_hash") == bench.hash]
        for e in found:
            print(_entry_line(e))
        if not found:
            print(f"no stored item parameters in {params_store.store_root()}", file=sys.stderr)
        return
    bench = _irt_benchmark(args.benchmark)
    if args.irt_command == "fit":
        y, _ = params_store.read_matrix(args.responses, bench)
        entry = params_store.fit_matrix(bench, y, model=args.model, dims=args.dims, fitter=args.fitter,
                                        seed=args.seed, file=Path(args.responses).name)
    else:
        params, extra = params_store.read_params(args.params, bench)
        entry = params_store.save_entry(bench, params, {"source": "imported", "rows": extra["rows"],
                                                        "file": Path(args.params).name})
    print(_entry_line(entry))


def cmd_benchmark_import(args) -> None:
    from core.fs import atomic_write
    from data.benchmarks import write_benchmark
    from data.lm_eval_tasks import import_task

    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError("--num-fewshot: must be 0 or more")
    items, mapping = import_task(args.lm_eval_task, args.data, args.fewshot_data, args.num_fewshot,
                                 args.fewshot_sampler, args.limit)
    out = write_benchmark(args.out, items)
    atomic_write(Path(f"{args.out}.lm_eval.json"), json.dumps(mapping, indent=2))
    stop = f"; set evaluation.stop to {mapping['until']}" if mapping.get("until") else ""
    print(f"{out}: {len(items)} items ({mapping['output_type']}, {mapping['num_fewshot']}-shot){stop}")

