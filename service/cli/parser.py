"""The `evomerge` argument parser: every command, its flags and its help, in one place; each
subcommand sets `func`, the function in `service.cli.library` or `service.cli.service` that runs it."""
from __future__ import annotations

import argparse
import re

from service.client import DEFAULT_URL

from .library import (
    cmd_benchmark_import,
    cmd_cache,
    cmd_compress,
    cmd_evolve,
    cmd_export,
    cmd_irt,
    cmd_merge,
    cmd_methods,
    cmd_plan,
    cmd_zoo_build,
)
from .service import (
    cmd_benchmark,
    cmd_cancel,
    cmd_demo,
    cmd_download,
    cmd_serve,
    cmd_status,
    cmd_submit,
    cmd_worker,
)


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model merging on one GPU.")
    sub = ap.add_subparsers(dest="command", required=True)
    _library_commands(sub)
    _service_commands(sub)
    return ap


def _library_commands(sub) -> None:
    p = sub.add_parser("merge", help="merge models as a spec of kind: merge (or a mergekit config) says")
    p.add_argument("spec", help="YAML job spec (kind: merge), or a mergekit YAML config (merge_method: ...)")
    p.add_argument("--out", required=True, help="output HF model folder (must not exist)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the spec)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads for the merge's arithmetic (default: all cores)")
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
    p.add_argument("--out", help="output HF model folder")
    p.add_argument("--mergekit-yaml", help="also (or instead) write a mergekit config that reproduces the candidate")
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
                   help="processes training fine-tunes side by side (default: one per core, at most 4; "
                        "weights do not depend on it)")
    z.set_defaults(func=cmd_zoo_build)

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

    p = sub.add_parser("irt", help="IRT item parameters per benchmark, fitted on a leaderboard's answers or "
                                   "imported; a job on that benchmark uses them (docs/guide.md)")
    isub = p.add_subparsers(dest="irt_command", required=True)
    i = isub.add_parser("fit", help="fit item parameters on a response matrix and store them")
    i.add_argument("--responses", required=True, help="CSV or Parquet (a row per model, a column per item id, "
                                                      "1/0/blank; a first column of model names is allowed) or NPZ "
                                                      "(responses, item_ids)")
    i.add_argument("--benchmark", required=True, help="JSONL file, or the name of a benchmark uploaded to the service")
    i.add_argument("--model", default="2pl", choices=["1pl", "2pl", "multidim_2pl"])
    i.add_argument("--dims", type=int, default=1, help="ability dimensions (multidim_2pl only)")
    i.add_argument("--fitter", default="map", choices=["map", "py-irt"])
    i.add_argument("--seed", type=int, default=42)
    i.set_defaults(func=cmd_irt)
    i = isub.add_parser("import", help="store tinyBenchmarks-style parameters (A, B, item_ids; JSON or NPZ)")
    i.add_argument("--params", required=True, help="JSON or NPZ with A ([dims, items] or [items, dims]), B "
                                                   "([items]) and item_ids")
    i.add_argument("--benchmark", required=True, help="JSONL file, or the name of a benchmark uploaded to the service")
    i.set_defaults(func=cmd_irt)
    i = isub.add_parser("list", help="one line per stored entry: benchmark, hash, items, source, rows, model, date")
    i.add_argument("--benchmark", help="only this benchmark's entries")
    i.set_defaults(func=cmd_irt)


def _service_commands(sub) -> None:
    def client_args(p):
        p.add_argument("--url", help=f"API address (default: $EVOMERGE_URL or {DEFAULT_URL})")
        p.add_argument("--token", help="bearer token (default: $EVOMERGE_TOKEN)")

    p = sub.add_parser("serve", help="run the REST API and one worker per device")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", help="SQLAlchemy URL (default: $EVOMERGE_DB or SQLite in the artifacts folder)")
    p.add_argument("--artifacts", help="artifacts folder (default: $EVOMERGE_ARTIFACTS or ./artifacts)")
    p.add_argument("--model-root", action="append", dest="model_roots",
                   help="folder model paths must lie in (repeatable; default: $EVOMERGE_MODEL_ROOTS or the CWD)")
    p.add_argument("--devices", help="comma-separated devices to start workers on; '' for none "
                                     "(default: every GPU, or the CPU)")
    p.add_argument("--ray-address", help="run jobs on this Ray cluster (auto, HOST:PORT, ray://HOST:PORT) instead of "
                                         "one worker per device (default: $EVOMERGE_RAY_ADDRESS)")
    p.add_argument("--ray-jobs", type=int, help="with --ray-address: jobs running at once (default: "
                                                "$EVOMERGE_RAY_JOBS or 4)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run jobs from the store on one device")
    p.add_argument("--db", help="SQLAlchemy URL (default: $EVOMERGE_DB)")
    p.add_argument("--artifacts", help="artifacts folder (default: $EVOMERGE_ARTIFACTS or ./artifacts)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--ray-address", help="run the jobs of every device on this Ray cluster "
                                         "(default: $EVOMERGE_RAY_ADDRESS)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("submit", help="submit a job spec to the service")
    p.add_argument("spec", help="YAML job spec")
    p.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    client_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="show a job (or list jobs without an ID)")
    p.add_argument("id", nargs="?")
    p.add_argument("--json", action="store_true", help="print the whole job as JSON")
    client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("id")
    client_args(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("download", help="download a result candidate as a HF folder (or .tar)")
    p.add_argument("id")
    p.add_argument("cid", type=int, nargs="?", default=0, help="candidate id (a merge job's result is 0)")
    p.add_argument("--out", help="destination folder, or a path ending in .tar (default: ./<id>-<cid>)")
    client_args(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("benchmark", help="benchmarks: upload one to the service, or import an lm-eval task")
    bsub = p.add_subparsers(dest="benchmark_command", required=True)
    b = bsub.add_parser("upload", help="upload a JSONL benchmark to the service")
    b.add_argument("name")
    b.add_argument("file")
    client_args(b)
    b.set_defaults(func=cmd_benchmark)
    b = bsub.add_parser("import", help="an lm-evaluation-harness task over local dataset files, as a JSONL benchmark")
    b.add_argument("--lm-eval-task", required=True, help="the task's name in the installed lm-eval (e.g. arc_challenge)")
    b.add_argument("--data", nargs="+", required=True, help="the split to evaluate: Parquet, JSONL or JSON files")
    b.add_argument("--fewshot-data", nargs="+", help="the task's few-shot split, when it takes few-shot examples")
    b.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    b.add_argument("--fewshot-sampler", choices=["first_n"], help="take the few-shot split's first examples "
                                                                   "(where the task samples at random)")
    b.add_argument("--limit", type=int, help="only the first N documents")
    b.add_argument("--out", required=True, help="the JSONL benchmark to write; the mapping goes beside it "
                                                "(OUT.lm_eval.json)")
    b.set_defaults(func=cmd_benchmark_import)

    p = sub.add_parser("demo", help="build the tiny zoo, run an evolve job through the service, download the knee")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.set_defaults(func=cmd_demo)
