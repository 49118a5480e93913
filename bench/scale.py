"""Memory and time of an evolve job's resident merge at scale, against today's (e725664) and the physical floor.

A Llama-shaped model (default about 0.5 B parameters, bf16) and N fine-tunes (default 3) are
written on the spot into bench/out/scale/ (reused when present). Each configuration
(implementation x method x store) runs in its own fresh subprocess, which

1. imports torch, transformers, the Llama modeling code and `evolve.materialize`, runs one
   matmul, and then records its RSS ("process baseline": excluded from every multiple below,
   printed) and resets its peak RSS (`/proc/self/clear_refs` 5);
2. builds the resident merge (`ResidentMerge(...)`: setup) and materializes candidates with
   random parameters from the method's default search space (numpy seed fixed, the same draws
   for every configuration);
3. reads its peak RSS (VmHWM), then measures the machine's copy bandwidth (a 1 GB tensor copied
   into another, best of 5, counted as bytes read + bytes written per second) in the same
   process, on the same threads.

Reported per configuration:
- peak = VmHWM - process baseline, as a multiple of the model's bf16 size (2 bytes x parameters);
- the memory plan's prediction (`evolve.plan.plan_job`: resident model + task-vector store + merge
  working set, the components the materialize loop holds on the host) and measured / predicted;
- seconds per candidate (mean over the candidates after the first, which also faults the model's
  pages in), and its floor: bytes moved per candidate / copy bandwidth, where bytes are
  fresh: base read (the base's safetensors bytes) + store read + model written;
  incremental (reanchor_every > 1, between fresh ones): model read + model written + store read;
  today's implementation: its cache (float32 base + prepared task vectors, TIES' float32 ranks) read
  + its float32 model written.

Today's ResidentMerge (commit e725664, everything float32, TIES with a float32 rank per entry)
runs from `git archive e725664` extracted into bench/out/baseline_src, imported through
PYTHONPATH (the worker prints the `evolve.materialize` file it imported). Its TIES needs about
20x the bf16 model size (about 20 GB at 0.5 B): it runs on a smaller model (--baseline-ties-params,
default 0.17 B) next to the new TIES on that same model, and the multiple is compared as is. A
configuration whose predicted peak does not fit the available memory is skipped with the reason.

Fine-tunes: base + tau with, per matrix, tau = 0.002 x (U V^T) / sqrt(16), U, V standard normal of
rank 16 (so the lowrank store has structure to keep), plus 0.0005 x standard normal noise (full
rank); vectors (norms) get 0.002 x noise. Base: 0.02 x standard normal per matrix, norms 1.

    .venv/bin/python bench/scale.py [--params 0.5e9] [--models 3] [--candidates 50]
        [--methods ties,task_arithmetic] [--stores dense,lowrank,sparse] [--threads 2]
        [--reanchor 1] [--budget-minutes 40] [--no-baseline] [--no-7b]

Writes bench/out/scale/results.json and prints markdown tables (bench/README.md, "Consumer-GPU scale", holds a run's).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "scale"
BASELINE_COMMIT = "e725664"
BASELINE_SRC = ROOT / "bench" / "out" / "baseline_src"
GB = 10**9
# today's peak as a multiple of the bf16 model (the measurements), for the fit check only
BASELINE_MULTIPLE = {"task_arithmetic": 11.5, "ties": 20.2}
LOWRANK_STRUCTURE, TAU_SCALE, NOISE_SCALE, INIT_SCALE = 16, 0.002, 0.0005, 0.02
FAMILY_VERSION = 1  # bump when the way models are generated changes


# --- models --------------------------------------------------------------------------------------

def llama_shape(params: float) -> dict:
    """A Llama config (GQA, 4 query heads per kv head, untied) of about `params` parameters."""
    for limit, hidden, vocab in ((20e6, 128, 4096), (100e6, 512, 16000), (350e6, 768, 32000),
                                 (800e6, 1024, 32000), (3e9, 2048, 32000), (math.inf, 4096, 32000)):
        if params < limit:
            break
    heads = max(2, hidden // 64)
    kv, head_dim = max(1, heads // 4), hidden // heads
    inter = max(64, round(hidden * 8 / 3 / 64) * 64)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def shapes_of(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of LlamaForCausalLM(config), from a model on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def build_family(root: Path, params: float, n_models: int, log=print, device: str = "cpu",
                 extra_files=None) -> tuple[Path, list[Path], dict]:
    """<root>/{base, ft0..ft(N-1)}: a random bf16 Llama of about `params` parameters and N fine-tunes
    (see the module docstring), written with safetensors' save_file; reused when complete.
    `extra_files(folder)` writes more files (a tokenizer) into each folder. Returns (base, fts, config)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = llama_shape(params)
    tag = (f"llama-h{shape['hidden_size']}-l{shape['num_hidden_layers']}-i{shape['intermediate_size']}"
           f"-v{shape['vocab_size']}-g{FAMILY_VERSION}")
    root = root / tag
    base, fts = root / "base", [root / f"ft{i}" for i in range(n_models)]
    if all((f / "model.safetensors").is_file() for f in [base, *fts]):
        return base, fts, shape
    config = LlamaConfig(**shape, torch_dtype="bfloat16")
    shapes = shapes_of(config)
    n = sum(math.prod(s) for s in shapes.values())
    log(f"building {tag}: {n / 1e9:.3f} B parameters, base + {n_models} fine-tunes in {root} (device {device})")
    t0 = time.perf_counter()

    def write(folder: Path, tensors: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        if extra_files:
            extra_files(folder)
        tmp = folder / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "model.safetensors")

    g = torch.Generator(device).manual_seed(0)
    base_t = {}
    for name, s in shapes.items():
        if len(s) == 1:
            base_t[name] = torch.ones(s, dtype=torch.bfloat16)
        else:
            base_t[name] = (torch.randn(s, generator=g, device=device) * INIT_SCALE).to("cpu", torch.bfloat16)
    if not (base / "model.safetensors").is_file():
        write(base, base_t)
    for i, ft in enumerate(fts):
        if (ft / "model.safetensors").is_file():
            continue
        g = torch.Generator(device).manual_seed(1000 + i)
        t = {}
        for name, s in shapes.items():
            b = base_t[name].to(device, torch.float32)
            if len(s) == 1:
                tau = TAU_SCALE * torch.randn(s, generator=g, device=device)
            else:
                u = torch.randn(s[0], LOWRANK_STRUCTURE, generator=g, device=device)
                v = torch.randn(LOWRANK_STRUCTURE, s[1], generator=g, device=device)
                tau = (u @ v).mul_(TAU_SCALE / math.sqrt(LOWRANK_STRUCTURE))
                tau.add_(torch.randn(s, generator=g, device=device), alpha=NOISE_SCALE)
            t[name] = b.add_(tau).to("cpu", torch.bfloat16)
            del tau, b
        write(ft, t)
        del t
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return base, fts, shape


def plan_benchmark(path: Path) -> Path:
    """A one-item multiple-choice benchmark (the plan needs objectives; evaluation is not measured here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text(json.dumps({"id": "q0", "prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n")
    return path


def evolve_spec(base: Path, fts: list[Path], method: str, bench: Path, device: str = "cpu", **evaluation):
    from evolve.spec import EvolveSpec

    return EvolveSpec.model_validate({
        "kind": "evolve", "base": str(base), "method": method, "device": device,
        "models": [{"name": f"ft{i}", "path": str(p)} for i, p in enumerate(fts)],
        "objectives": [{"benchmark": str(bench)}],
        "evaluation": {"batch_size": 1, "max_new_tokens": 1} | evaluation})


def predicted_peak(base, fts, method, store, rank, density, reanchor, bench) -> dict | None:
    """The plan's host bytes of the materialize loop: resident model + task-vector store + merge working set."""
    try:
        from evolve.plan import plan_job
    except ImportError:
        return None
    spec = evolve_spec(base, fts, method, bench, dtype="bfloat16", store=store, store_rank=rank,
                       store_density=density, reanchor_every=reanchor)
    plan = plan_job(spec, host_memory=math.inf)
    loop = ("resident model", "task-vector store", "method state", "merge working set")
    parts = {c.name: c.bytes for c in plan.components if c.name in loop and not getattr(c, "build_only", False)}
    build = {c.name: c.bytes for c in plan.components if getattr(c, "build_only", False)}
    # the loop's components; or, while the store is built (before the model exists), the store + the build's
    peak = max(sum(parts.values()), plan.component("task-vector store").bytes + sum(build.values()))
    return {"bytes": peak, "parts": parts | build, "moved": plan.moved}


# --- the worker (one configuration, in its own process) -------------------------------------------

def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def copy_bandwidth(nbytes: int = GB, reps: int = 5) -> float:
    """Bytes read + written per second by one large tensor copy (best of `reps`)."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def worker(cfg: dict) -> dict:
    import gc
    import resource

    import numpy as np
    import torch
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (imported by setup otherwise)

    torch.set_num_threads(cfg["threads"])
    import evolve.materialize as mat
    import merging.chunks

    if cfg.get("chunk"):  # an experiment: rows merged per run (elements), instead of merging.chunks.CHUNK
        merging.chunks.CHUNK = cfg["chunk"]
    from evolve.genome import SearchSpace
    from merging.checkpoint import CheckpointReader

    torch.zeros(64, 64) @ torch.zeros(64, 64)  # torch's first-use allocations before the baseline
    gc.collect()
    baseline = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False

    t0 = time.perf_counter()
    if cfg["impl"] == "today":
        rm = mat.ResidentMerge(cfg["base"], cfg["fts"], cfg["method"], device="cpu")
    else:
        store = mat.store_settings_for(torch.bfloat16, cfg["store"], rank=cfg["rank"], density=cfg["density"])
        rm = mat.ResidentMerge(cfg["base"], cfg["fts"], cfg["method"], device="cpu", dtype="bfloat16",
                               store=store, reanchor_every=cfg["reanchor"])
    setup_s = time.perf_counter() - t0
    after_setup = {"rss": _status("VmRSS") - baseline, "peak": _status("VmHWM") - baseline}
    progress = Path(cfg["progress"]) if cfg.get("progress") else None

    def report(**kw) -> None:  # what the driver shows if this process runs out of time
        if progress:
            progress.write_text(json.dumps({"setup_s": setup_s, "after_setup": after_setup,
                                            "peak": _status("VmHWM") - baseline, **kw}))

    report(times=[])

    space = SearchSpace(cfg["method"], len(cfg["fts"]))
    low, high = space.bounds
    rng = np.random.default_rng(cfg["seed"])
    times: list[float] = []
    cpu: list[float] = []
    faults: list[int] = []
    loop_start = time.perf_counter()
    for i in range(cfg["candidates"]):
        x = low + rng.random(space.n_var) * (high - low)
        p = space.params(x)[0]
        u0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        rm.materialize(p)
        times.append(time.perf_counter() - t)
        u1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime)
        faults.append(u1.ru_minflt - u0.ru_minflt)
        report(times=times)
        if i + 1 >= cfg["min_candidates"] and time.perf_counter() - loop_start > cfg["loop_seconds"]:
            break
    peak = _status("VmHWM") - baseline
    rss_end = _status("VmRSS") - baseline

    model_bytes = sum(t.numel() * t.element_size() for t in rm.targets.values())
    n_params = sum(t.numel() for t in rm.targets.values())
    reader = CheckpointReader(cfg["base"])
    base_disk = sum(reader.info(n).numel * reader.info(n).dtype.itemsize for n in reader.names())
    store_bytes = rm.cache_bytes
    if cfg["impl"] == "today":
        moved = {"cache read": store_bytes, "model written": model_bytes}
    else:
        k = cfg["reanchor"]
        moved = {"base read": base_disk // k, "store read": store_bytes,
                 "model read": model_bytes * (k - 1) // k, "model written": model_bytes}
    # a fingerprint of the last candidate, to compare implementations on the same model and draws
    with torch.no_grad():
        l1 = float(sum(t.double().abs().sum() for t in rm.targets.values()))
    del rm
    gc.collect()
    bw = copy_bandwidth()
    return {"module": mat.__file__, "baseline_rss": baseline, "hwm_reset": hwm_reset, "setup_s": setup_s,
            "after_setup": after_setup, "peak": peak, "rss_end": rss_end, "times": times, "cpu_s": cpu,
            "minor_faults": faults,
            "model_bytes": model_bytes, "n_params": n_params, "store_bytes": store_bytes, "base_disk": base_disk,
            "moved": moved, "copy_bw": bw, "l1": l1, "threads": torch.get_num_threads()}


def run_worker(cfg: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]),
               TOKENIZERS_PARALLELISM="false")
    if cfg.get("malloc") == "keep":  # glibc keeps freed chunks (<= 32 MB) for reuse instead of returning them
        env |= {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
    if cfg["impl"] == "today":
        env["PYTHONPATH"] = str(BASELINE_SRC)
        cwd = BASELINE_SRC
    else:
        env["PYTHONPATH"] = str(ROOT)
        cwd = ROOT
    progress = OUT / "progress.json"
    progress.unlink(missing_ok=True)
    cfg = cfg | {"progress": str(progress)}
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)], cwd=cwd,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        got = json.loads(progress.read_text()) if progress.is_file() else {}
        what = (f"setup {got['setup_s']:.0f} s, {len(got['times'])} candidates done "
                f"({', '.join(f'{t:.0f}' for t in got['times'])} s), peak so far {got['peak'] / GB:.2f} GB"
                if got else "setup not finished")
        return {"error": f"timed out after {timeout:.0f} s: {what}", "partial": got}
    if r.returncode != 0:
        return {"error": f"worker exited {r.returncode}: {r.stderr.strip()[-2000:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the driver ----------------------------------------------------------------------------------

def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    load = os.getloadavg()
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    return {"cpu": cpu, "nproc": os.cpu_count(), "mem_total": mem, "load_at_start": load,
            "python": platform.python_version(), "commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("diff", "--name-only", "HEAD", "--", "evolve", "merging", "fitness").split()}


def extract_baseline() -> None:
    if (BASELINE_SRC / "evolve" / "materialize.py").is_file():
        return
    BASELINE_SRC.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", BASELINE_COMMIT], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(BASELINE_SRC)], input=archive, check=True)


def fmt_gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def seven_b_plans(methods: list[str], log) -> list[list]:
    """The plan for a Llama-2-7B-shaped base (headers only, sparse files) with 3 and 5 fine-tunes on a
    24 GB GPU with 32 GB of host memory, store auto, batch 16, per method."""
    import struct

    from transformers import LlamaConfig

    from evolve.plan import plan_job

    root = OUT / "shapes7b"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    shapes = shapes_of(cfg)
    folders = [root / "base", *(root / f"ft{i}" for i in range(5))]
    for f in folders:
        if (f / "model.safetensors").is_file():
            continue
        f.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(f)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in sorted(shapes):
            nbytes = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(f / "model.safetensors", "wb") as fh:  # header only; truncate() makes the rest a hole
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
    bench = root / "mc.jsonl"
    bench.write_text("".join(json.dumps({"id": f"q{k}", "prompt": "Question: " + "x" * 290 + " Answer:",
                                         "choices": [" yes", " no", " maybe", " unknown"], "answer": k % 4}) + "\n"
                             for k in range(8)))
    rows = []
    for method in methods:
        for n in (3, 5):
            spec = evolve_spec(folders[0], folders[1:1 + n], method, bench, device="cuda", store="auto", batch_size=16)
            plan = plan_job(spec, gpu_memory=24 * GB, host_memory=32 * GB)
            log(plan.table())
            opts = ", ".join(f"{k} {v / GB:.1f}" for k, v in plan.store_options.items())
            rows.append([method, n, plan.store_kind, plan.store_where, fmt_gb(plan.component("resident model").bytes),
                         fmt_gb(plan.component("task-vector store").bytes),
                         fmt_gb(plan.component("merge working set").bytes), fmt_gb(plan.totals["gpu"]),
                         fmt_gb(plan.totals["host"]), fmt_gb(plan.bytes_moved_per_candidate), opts,
                         "yes" if plan.fits else f"no: {plan.error}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=0.5e9)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--min-candidates", type=int, default=3, help="at least this many per configuration")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--stores", default="dense,lowrank,sparse")
    ap.add_argument("--rank", type=float, default=0.1, help="lowrank store: fraction of the rank kept (default setting)")
    ap.add_argument("--density", type=float, default=0.1, help="sparse store: fraction of entries kept (default setting)")
    ap.add_argument("--reanchor", default="1", help="reanchor_every values to run (comma-separated; 1 = every candidate fresh)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-minutes", type=float, default=40.0,
                    help="wall-clock budget: each configuration's candidate loop gets an equal share of what is left")
    ap.add_argument("--baseline-ties-params", type=float, default=0.17e9,
                    help="model size for today's TIES (its 20x peak does not fit 24 GB at 0.5 B)")
    ap.add_argument("--no-baseline", action="store_true", help="skip today's implementation")
    ap.add_argument("--no-7b", action="store_true", help="skip the 7B plan table")
    ap.add_argument("--malloc-keep", default="task_arithmetic:dense",
                    help="method:store pairs also run with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_=32 MiB, "
                         "MALLOC_TRIM_THRESHOLD_=16 GiB): shows what first-touch page faults cost")
    ap.add_argument("--config-timeout", type=float, default=1800.0, help="seconds before a configuration's process is stopped")
    ap.add_argument("--malloc", choices=["default", "keep"], default="default",
                    help="keep: every configuration of the new implementation runs with glibc keeping freed memory")
    ap.add_argument("--chunk", type=int, help="experiment: merging.chunks.CHUNK (elements per run of rows) in the "
                                              "new implementation's processes and in the plan")
    ap.add_argument("--results", default="results.json", help="file name under bench/out/scale/")
    ap.add_argument("--shared", default="yes", help="was the machine shared with other work (printed)")
    ap.add_argument("--render", type=Path, help="print the tables of a results file and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.render:
        doc = json.loads(args.render.read_text())
        doc["machine"].setdefault("shared", doc["args"].get("shared", "yes"))
        print(render(doc))
        return

    started = time.perf_counter()
    deadline = started + args.budget_minutes * 60
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    info = machine() | {"threads": args.threads, "shared": args.shared}
    log(f"machine: {info}")
    OUT.mkdir(parents=True, exist_ok=True)
    methods, stores = args.methods.split(","), args.stores.split(",")
    reanchors = [int(k) for k in args.reanchor.split(",")]
    keep = set(filter(None, args.malloc_keep.split(",")))
    if args.chunk:
        import merging.chunks

        merging.chunks.CHUNK = args.chunk
    base, fts, shape = build_family(OUT, args.params, args.models, log)
    bench = plan_benchmark(OUT / "plan_bench.jsonl")

    configs = []
    if not args.no_baseline:
        extract_baseline()
    for method in methods:  # per method: today's (and its pair on the smaller model) first, then the new stores
        if not args.no_baseline:
            if method == "ties" and args.baseline_ties_params != args.params:
                sb, sfts, sshape = build_family(OUT, args.baseline_ties_params, args.models, log)
                for impl in ("today", "new"):  # the pair on the smaller model
                    configs.append({"impl": impl, "method": method, "store": "dense" if impl == "new" else "fp32",
                                    "reanchor": 1, "base": str(sb), "fts": list(map(str, sfts)), "shape": sshape})
            else:
                configs.append({"impl": "today", "method": method, "store": "fp32", "reanchor": 1,
                                "base": str(base), "fts": list(map(str, fts)), "shape": shape})
        for store in stores:
            for k in reanchors:
                for malloc in ("default", "keep") if f"{method}:{store}" in keep else (args.malloc,):
                    configs.append({"impl": "new", "method": method, "store": store, "reanchor": k, "malloc": malloc,
                                    "base": str(base), "fts": list(map(str, fts)), "shape": shape, "chunk": args.chunk})

    results = []
    for i, c in enumerate(configs):
        c |= {"threads": args.threads, "seed": args.seed, "candidates": args.candidates,
              "min_candidates": min(args.min_candidates, args.candidates), "rank": args.rank, "density": args.density}
        n_params = sum(math.prod(s) for s in shapes_of_cached(c["shape"]).values())
        bf16 = 2 * n_params
        label = (f"{c['impl']} {c['method']} {c['store']}" + (f" reanchor {c['reanchor']}" if c["reanchor"] > 1 else "")
                 + (" malloc keep" if c.get("malloc") == "keep" else ""))
        pred = None if c["impl"] == "today" else predicted_peak(Path(c["base"]), [Path(f) for f in c["fts"]], c["method"],
                                                                c["store"], args.rank, args.density, c["reanchor"], bench)
        guess = BASELINE_MULTIPLE[c["method"]] * bf16 if c["impl"] == "today" else (pred["bytes"] * 1.3 if pred else 6 * bf16)
        guess += 1e9 + GB  # process baseline, and the 1 GB copy-bandwidth test (x2) after the loop
        avail = mem_available()
        entry = {"config": c, "label": label, "bf16_bytes": bf16, "predicted": pred}
        if guess > avail - 1.0 * GB:
            entry["skipped"] = (f"predicted peak {guess / GB:.1f} GB (with process baseline and margin) over "
                                f"MemAvailable {avail / GB:.1f} GB less 1 GB")
            log(f"[{i + 1}/{len(configs)}] {label}: skipped, {entry['skipped']}")
            results.append(entry)
            continue
        left = deadline - time.perf_counter()
        c["loop_seconds"] = max(30.0, 0.7 * left / (len(configs) - i))  # setup takes the rest
        log(f"[{i + 1}/{len(configs)}] {label} on {n_params / 1e9:.3f} B params (loop budget {c['loop_seconds']:.0f} s)")
        entry |= run_worker(c, timeout=args.config_timeout)
        if "error" in entry:
            log(f"  failed: {entry['error']}")
        else:
            m = metrics(entry)
            log(f"  module {entry['module']}; setup {entry['setup_s']:.1f} s, {len(entry['times'])} candidates, "
                f"{m['mean_s']:.2f} s each, peak {entry['peak'] / bf16:.2f}x bf16, copy {entry['copy_bw'] / GB:.1f} GB/s")
        results.append(entry)
        doc = {"machine": info, "args": vars(args), "results": results, "minutes": (time.perf_counter() - started) / 60}
        (OUT / args.results).write_text(json.dumps(doc, indent=1, default=str))

    seven = []
    if not args.no_7b:
        try:
            seven = seven_b_plans(methods, lambda m: print(m, file=sys.stderr))
        except ImportError as e:
            log(f"7B plans skipped: {e}")
    doc = {"machine": info, "args": vars(args), "results": results, "seven_b": seven,
           "minutes": (time.perf_counter() - started) / 60}
    text = render(doc)
    print(text)
    (OUT / args.results).write_text(json.dumps(doc | {"markdown": text}, indent=1, default=str))


def metrics(e: dict) -> dict:
    """Per-candidate numbers of one configuration, over the candidates after the first."""
    rest = slice(1, None) if len(e["times"]) > 1 else slice(None)
    t = sorted(e["times"][rest])
    mean = sum(t) / len(t)
    floor = sum(e["moved"].values()) / e["copy_bw"]
    out = {"mean_s": mean, "median_s": (t[(len(t) - 1) // 2] + t[len(t) // 2]) / 2, "floor_s": floor,
           "ratio": mean / floor}
    if "cpu_s" in e:
        out["cpu_s"] = sum(e["cpu_s"][rest]) / len(e["cpu_s"][rest])
        out["faults"] = sum(e["minor_faults"][rest]) / len(e["minor_faults"][rest])
    return out


def render(doc: dict) -> str:
    """The markdown tables of a results document."""
    args, info, results = doc["args"], doc["machine"], doc["results"]
    n_models = args["models"]

    def size(c: dict) -> str:
        return f"{sum(math.prod(s) for s in shapes_of_cached(c['shape']).values()) / 1e9:.2f} B"

    rows = []
    for e in results:
        c = e["config"]
        store = (c["store"] + (f" r{c['reanchor']}" if c["reanchor"] > 1 else "")
                 + (" +keep" if c.get("malloc") == "keep" else "") + (f" chunk {c['chunk']}" if c.get("chunk") else ""))
        if "skipped" in e or "error" in e:
            note = e.get("skipped") or e["error"][:300].replace("|", "/").replace("\n", " ")
            rows.append([c["impl"], c["method"], store, size(c)] + ["-"] * 17 + [note])
            continue
        bf16, pred, m = e["bf16_bytes"], e["predicted"], metrics(e)
        target = (f"<= {n_models + 1.3:.1f}x" if c["store"] == "dense" else "<= 1.5x") if c["impl"] == "new" else ""
        rows.append([
            c["impl"], c["method"], store, size(c), f"{e['baseline_rss'] / GB:.2f}", f"{e['setup_s']:.0f}",
            f"{e['after_setup']['peak'] / bf16:.2f}x", f"{e['peak'] / bf16:.2f}x", target,
            f"{pred['bytes'] / bf16:.2f}x" if pred else "-", f"{e['peak'] / pred['bytes']:.2f}" if pred else "-",
            f"{e['store_bytes'] / bf16:.2f}x", len(e["times"]), f"{m['mean_s']:.2f}", f"{m['median_s']:.2f}",
            f"{m['cpu_s']:.1f}" if "cpu_s" in m else "-", f"{m['faults'] / 1e3:.0f}k" if "faults" in m else "-",
            f"{sum(e['moved'].values()) / GB:.2f}", f"{e['copy_bw'] / GB:.1f}", f"{m['floor_s']:.2f}",
            f"{m['ratio']:.1f}x", ""])
    header = ["impl", "method", "store", "model", "process baseline GB", "setup s", "peak in setup / bf16",
              "peak / bf16", "target", "plan / bf16", "measured / plan", "store / bf16", "candidates",
              "s / candidate (mean)", "median s", "CPU s / candidate", "minor faults / candidate",
              "GB moved / candidate", "copy GB/s", "floor s", "time / floor", "note"]
    out = [f"## Resident merge at scale: {n_models} fine-tunes, bf16, CPU", "",
           f"machine: {info['cpu']}, {info['nproc']} cores, {info['mem_total'] / GB:.1f} GB RAM; torch threads "
           f"{args['threads']} (OMP_NUM_THREADS={args['threads']}); shared with other work: {info['shared']} (load "
           f"average at start {', '.join(f'{x:.2f}' for x in info['load_at_start'])}); total {doc['minutes']:.1f} min; "
           f"code: commit {info.get('commit', '?')}"
           + (f" with uncommitted changes to {', '.join(info['modified'])}" if info.get("modified") else ""), "",
           "peak = VmHWM - RSS after imports (the process baseline, torch + transformers + the package, is excluded and "
           "printed); bf16 = 2 bytes x parameters; s / candidate over the candidates after the first; floor = bytes "
           "moved per candidate / copy bandwidth (read + written)", "", table(header, rows)]
    by = {(e["config"]["impl"], e["config"]["method"], e["config"]["store"], e["config"]["base"]): e
          for e in results if "peak" in e and e["config"].get("malloc", "default") == "default"
          and not e["config"].get("chunk")}
    compare = []
    for (impl, method, store, b), e in by.items():
        new = by.get(("new", method, "dense", b))
        if impl == "today" and new:
            mt, mn = metrics(e), metrics(new)
            compare.append([method, size(e["config"]), f"{e['peak'] / e['bf16_bytes']:.2f}x",
                            f"{new['peak'] / new['bf16_bytes']:.2f}x", f"{e['peak'] / new['peak']:.2f}",
                            f"{mt['mean_s']:.2f}", f"{mn['mean_s']:.2f}", f"{mt['mean_s'] / mn['mean_s']:.2f}",
                            f"{abs(new['l1'] - e['l1']) / e['l1']:.1e}"])
    if compare:
        out += ["", "### Today (e725664, float32) against the new resident merge (bf16 model, dense bf16 store), "
                    "same model, same draws", "",
                table(["method", "model", "today peak / bf16", "new peak / bf16", "today / new memory",
                       "today s / cand", "new s / cand", "today / new time",
                       "last candidate: relative L1 difference, new vs today"], compare)]
    if doc.get("seven_b"):
        out += ["", "### The plan for Llama-2-7B shapes (headers only), store auto, batch 16, 24 GB GPU + 32 GB host", "",
                table(["method", "N", "store (auto)", "store on", "model GB", "store GB", "working set GB",
                       "GPU total GB", "host total GB", "moved / cand GB", "store options GB",
                       "fits 24 GB GPU + 32 GB host"], doc["seven_b"])]
    return "\n".join(out)


_SHAPES: dict[str, dict] = {}


def shapes_of_cached(shape: dict) -> dict[str, tuple[int, ...]]:
    key = json.dumps(shape, sort_keys=True)
    if key not in _SHAPES:
        from transformers import LlamaConfig

        _SHAPES[key] = shapes_of(LlamaConfig(**shape))
    return _SHAPES[key]


if __name__ == "__main__":
    main()
