#!/usr/bin/env python3
"""Merge speed, peak memory and numerical agreement: evomerge against mergekit.

What it does
------------
1. Builds the inputs locally (no download): a Llama-shaped model of about ``--params``
   parameters (a ``transformers.LlamaConfig``; the number of layers is solved for the
   target size) with random weights (N(0, 0.02), norms at 1), saved in bfloat16 as a
   sharded Hugging Face folder (``model-0000i-of-0000n.safetensors`` + index), and
   ``--models`` "fine-tunes" = base + N(0, ``--delta-std``) perturbations, also bf16.
   Only shard-sized buffers are held while writing.
2. Creates mergekit's own virtual environment on demand (``bench/out/venv-mergekit``,
   or ``--mergekit-venv``;
   ``python3 -m venv`` + ``pip install -c constraints.txt mergekit==MERGEKIT_VERSION``;
   the constraints file keeps torch at the local CPU build). mergekit never shares a
   venv with evomerge.
3. For each method (task_arithmetic, ties) runs one merge with each tool on the same
   inputs and equivalent parameters, every merge in its own subprocess:
   * evomerge: ``<repo>/.venv/bin/python -c "from merging import merge; merge(spec, out)"``
     (or the CLI ``evomerge merge spec.yaml --out DIR`` with ``--evomerge-entry cli``);
   * mergekit: ``mergekit-yaml config.yml OUT --no-copy-tokenizer --out-shard-size ...``
     (CPU; ``--lazy-unpickle`` is not passed because it only affects pickled ``.bin``
     inputs, and these are safetensors).
   Before every merge the input files are read once so that both tools start from a
   warm page cache.
4. Compares the two output folders tensor by tensor (``safe_open``, one tensor at a
   time): max |evomerge - mergekit| over all tensors and the share of elements that
   differ at all.

What is measured
----------------
* seconds: wall time of the merge subprocess, from spawn to exit (interpreter start
  and imports included, for both tools; each CLI / ``-c`` call is one complete merge).
* CPU s: user + system CPU time of that subprocess (``os.wait4``). On a shared machine
  wall time varies with the load of other processes; CPU time much less so.
* peak RSS: ``ru_maxrss`` of that subprocess (``os.wait4`` on its pid; includes the
  descendants it waited for). Resident pages of memory-mapped input files count, as
  the kernel counts them.
* anon / file GB: peaks of the subprocess's anonymous and file-backed resident memory
  (/proc/<pid>/status RssAnon, RssFile+RssShmem, polled every 20 ms). File-backed pages
  are memory-mapped input (or output) files: they count in RSS, but the kernel can drop
  them under pressure, so anon is the part that really has to fit in RAM.
* max |diff| and differing %: over every tensor of the outputs (both bf16).
* of which top-k ties (ties only, ``--explain-ties``, on by default): how many of the
  differing elements sit where some task vector has an entry whose magnitude equals
  its k-th largest, i.e. where "keep the top k" does not say which entries to keep.
* mk/evo time, mk/evo mem: mergekit's time and peak RSS divided by evomerge's
  (above 1 = evomerge faster / leaner).

Equivalence of parameters
-------------------------
* task_arithmetic: evomerge ``{weights, lambda}``; mergekit ``task_arithmetic`` with
  per-model ``weight``, ``lambda`` and ``normalize: false`` (its default).
* ties: evomerge ``{density, weights, lambda}``; mergekit ``ties`` with per-model
  ``weight`` and ``density``, ``lambda``, ``normalize: true`` (its default for ties).
  Both trim each task vector to its top ``int(density*numel)`` entries by magnitude
  (up to ties at the boundary, see below),
  elect the sign from the sum of the weighted trimmed vectors (0 counts as +), take
  the disjoint weighted mean and add ``lambda`` times it to the base.
* Precision: mergekit computes in its ``dtype`` (inputs are cast to it on load) and
  writes ``out_dtype``. The default here is ``dtype: float32, out_dtype: bfloat16``,
  which matches evomerge (float32 compute, bfloat16 output). ``--mergekit-dtype
  bfloat16`` makes mergekit compute in bf16 instead (its cheaper mode, less exact).
* Known source of differences in ties: entries of a task vector whose magnitude equals
  the k-th largest (common with bf16 inputs, whose task vectors take few distinct
  values). mergekit keeps exactly k entries, choosing among the tied ones by the order of
  an unstable ``torch.argsort`` (implementation-defined); evomerge's choice is its own
  (at the time of writing it keeps every entry tied at the boundary, i.e. slightly more
  than k). The "of which top-k ties" column checks that every differing element lies at
  such a tie, i.e. that the two tools agree everywhere the definition is unambiguous.

How to run
----------
    /work/main/.venv/bin/python bench/merge_speed.py --size small      # ~10M params, quick check
    /work/main/.venv/bin/python bench/merge_speed.py                   # ~0.5B params (default)
    /work/main/.venv/bin/python bench/merge_speed.py --params 1B --models 3 --density 0.5

Options: ``--params/--size`` (``small`` or a count such as ``500M``, ``0.5B``, ``1B``),
``--models N`` (fine-tunes, default 3), ``--methods``, ``--density``, ``--lambda``,
``--out DIR`` (default bench/out/merge_speed), ``--keep`` (keep the generated models and
the merged outputs; by default they are deleted at the end, the mergekit venv is kept),
``--mergekit-dtype``, ``--evomerge-entry {api,cli}``, ``--evomerge-hashes {cold,warm}``
(evomerge sha256-hashes its inputs for the model card and caches the hashes in
$EVOMERGE_CACHE; cold, the default, counts that hashing in the timed run, as a first merge
of new inputs pays it; warm hashes beforehand), ``--repeat R`` (fastest of R runs,
tools interleaved),
``--explain-ties/--no-explain-ties``, ``--tools``.
Everything large goes under ``--out`` (bench/out/ is git-ignored).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVOMERGE_PYTHON = REPO / ".venv" / "bin" / "python"
EVOMERGE_CLI = REPO / ".venv" / "bin" / "evomerge"
CONSTRAINTS = REPO / "constraints.txt"
# 0.1.5 installs cleanly next to torch==2.13.0 (CPU build) with the repo's constraints.
MERGEKIT_VERSION = "0.1.5"
SHARD_BYTES = 500_000_000  # input shard size: a 0.5B bf16 model becomes several shards
OUT_SHARD = "2GB"  # evomerge output shard size; mergekit gets the same in parameters


# ----------------------------------------------------------------------------- sizes
def parse_count(text: str) -> int:
    """'0.5B' -> 500_000_000, '20M' -> 20_000_000, 'small' -> 10M."""
    if text.lower() == "small":
        return 10_000_000
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"--params {text!r}: use 'small' or a count such as 500M, 0.5B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def llama_config_for(params: int):
    """A LlamaConfig whose parameter count is close to `params` (layers solved for)."""
    from transformers import LlamaConfig

    if params <= 50e6:
        h, inter, heads, kv, vocab = 256, 1024, 4, 2, 4096
    elif params <= 250e6:
        h, inter, heads, kv, vocab = 768, 2048, 12, 4, 32000
    elif params <= 800e6:
        h, inter, heads, kv, vocab = 1024, 4096, 16, 8, 32000
    else:
        h, inter, heads, kv, vocab = 2048, 5632, 32, 8, 32000
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    fixed = 2 * vocab * h + h
    layers = max(1, round((params - fixed) / per_layer))
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    for attr in ("torch_dtype", "dtype"):
        try:
            setattr(cfg, attr, "bfloat16")
        except Exception:
            pass
    return cfg


def model_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the persistent tensors, from a meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# ----------------------------------------------------------------------------- inputs
def make_inputs(root: Path, params: int, n_models: int, delta_std: float, seed: int) -> dict:
    """Writes base + n fine-tunes (bf16, sharded) under root; returns a description."""
    import torch
    from safetensors.torch import save_file

    cfg = llama_config_for(params)
    shapes = model_shapes(cfg)
    names = ["base"] + [f"m{i}" for i in range(n_models)]
    total = sum(math.prod(s) for _, s in shapes)
    shard_bytes = min(SHARD_BYTES, math.ceil(2 * total / 3))  # always sharded, 3+ shards
    stamp = {"params_target": params, "n_models": n_models, "delta_std": delta_std, "seed": seed,
             "shard_bytes": shard_bytes, "config": cfg.to_dict()}
    stamp_file = root / "inputs.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()).get("stamp") == json.loads(json.dumps(stamp)):
        print(f"[inputs] reusing {root}", flush=True)
        return json.loads(stamp_file.read_text())
    if root.exists():
        shutil.rmtree(root)

    # plan shards from shapes (same layout for every model)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n_sh = len(shards)
    fname = lambda i: f"model-{i + 1:05d}-of-{n_sh:05d}.safetensors"  # noqa: E731
    weight_map = {name: fname(i) for i, sh in enumerate(shards) for name, _ in sh}
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    dirs = {n: root / n for n in names}
    for d in dirs.values():
        d.mkdir(parents=True)
        cfg.save_pretrained(d)
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    print(f"[inputs] writing {len(names)} models of {total / 1e6:.1f}M params ({n_sh} shards each) to {root}",
          flush=True)
    for i, sh in enumerate(shards):
        bufs = {n: {} for n in names}
        for name, shape in sh:
            if name.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=g).mul_(0.02)
            bufs["base"][name] = base.to(torch.bfloat16)
            for n in names[1:]:
                ft = torch.randn(shape, generator=g).mul_(delta_std).add_(base)
                bufs[n][name] = ft.to(torch.bfloat16)
                del ft
            del base
        for n in names:
            save_file(bufs[n], str(dirs[n] / fname(i)), metadata={"format": "pt"})
        del bufs
    info = {
        "stamp": stamp,
        "params": total,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "shards": n_sh,
        "paths": {n: str(d) for n, d in dirs.items()},
        "gb_per_model": folder_bytes(dirs["base"]) / 1e9,
    }
    info["gb_total"] = sum(folder_bytes(d) for d in dirs.values()) / 1e9
    stamp_file.write_text(json.dumps(info, indent=2))
    print(f"[inputs] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return info


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def warm_cache(paths) -> None:
    """Reads every input shard once so that each tool starts with a warm page cache."""
    for p in paths:
        for f in sorted(Path(p).glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# ----------------------------------------------------------------------------- mergekit
def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    py = shutil.which("python3") or sys.executable
    print(f"[mergekit] creating {venv} (mergekit=={MERGEKIT_VERSION}, -c {CONSTRAINTS})", flush=True)
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(CONSTRAINTS),
                    f"mergekit=={MERGEKIT_VERSION}"], check=True)
    if not exe.exists():
        raise SystemExit(f"mergekit-yaml not found in {venv} after install")
    return exe


def mergekit_config(method: str, inputs: dict, n: int, weights, density, lam, dtype: str) -> dict:
    models = []
    for i in range(n):
        p = {"weight": weights[i]}
        if method == "ties":
            p["density"] = density
        models.append({"model": inputs["paths"][f"m{i}"], "parameters": p})
    return {
        "merge_method": method,
        "base_model": inputs["paths"]["base"],
        "models": models,
        "parameters": {"lambda": lam, "normalize": method == "ties"},
        "dtype": dtype,
        "out_dtype": "bfloat16",
    }


def evomerge_spec(method: str, inputs: dict, n: int, weights, density, lam) -> dict:
    params = {"weights": list(weights), "lambda": lam}
    if method == "ties":
        params["density"] = density
    return {
        "base": inputs["paths"]["base"],
        "models": [{"name": f"m{i}", "path": inputs["paths"][f"m{i}"]} for i in range(n)],
        "method": method,
        "params": params,
        "output": {"dtype": "bfloat16", "max_shard_size": OUT_SHARD},
        "device": "cpu",
    }


# ----------------------------------------------------------------------------- running
@dataclass
class Run:
    method: str
    tool: str
    seconds: float = float("nan")
    peak_gb: float = float("nan")
    ok: bool = False
    out: Path | None = None
    log: Path | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def _sample_rss(pid: int, peaks: dict, stop) -> None:
    """Polls /proc/<pid>/status; keeps the peaks of RssAnon and RssFile (+RssShmem) in GB."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as fh:
                vals = {}
                for line in fh:
                    if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                        key, kb = line.split()[:2]
                        vals[key[:-1]] = int(kb) * 1024 / 1e9
        except (OSError, ValueError):
            return
        if vals:
            peaks["anon"] = max(peaks.get("anon", 0.0), vals.get("RssAnon", 0.0))
            peaks["file"] = max(peaks.get("file", 0.0), vals.get("RssFile", 0.0) + vals.get("RssShmem", 0.0))
        stop.wait(0.02)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float, dict]:
    """Runs cmd; returns (exit code, wall seconds, peak RSS in GB, sampled peaks) of that subprocess.

    Peak RSS is the kernel's ru_maxrss for the child (exact). The sampled peaks split the
    resident memory into anonymous (heap: tensors being computed) and file-backed pages
    (memory-mapped inputs, reclaimable by the kernel); they are polled every 20 ms and can
    miss short spikes.
    """
    import threading

    peaks: dict = {}
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        stop = threading.Event()
        th = threading.Thread(target=_sample_rss, args=(proc.pid, peaks, stop), daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peaks["cpu_s"] = usage.ru_utime + usage.ru_stime
    return proc.returncode, wall, usage.ru_maxrss * 1024 / 1e9, peaks  # ru_maxrss is KiB on Linux


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_tool(tool: str, method: str, inputs: dict, args, work: Path, mk_exe: Path | None,
             r: Run | None = None, rep: int = 0) -> Run:
    """One merge with one tool, measured; keeps the fastest of the repetitions in `r`."""
    n = args.models
    weights = args.weights or [1.0] * n
    out = work / f"out-{method}-{tool}"
    cfg_file = work / f"{method}-{tool}.yml"
    log = work / f"{method}-{tool}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import yaml

    if r is None:
        r = Run(method, tool, out=out, log=log)
    if r.note:  # an earlier repetition failed
        return r
    if tool == "evomerge":
        spec = evomerge_spec(method, inputs, n, weights, args.density, args.lam)
        if args.evomerge_entry == "cli":
            cfg_file.write_text(yaml.safe_dump({"kind": "merge", **spec}, sort_keys=False))
            cmd = [str(EVOMERGE_CLI), "merge", str(cfg_file), "--out", str(out)]
        else:
            cfg_file.write_text(json.dumps(spec, indent=2))
            code = ("import json, sys; from merging import merge; "
                    "merge(json.load(open(sys.argv[1])), sys.argv[2])")
            cmd = [str(EVOMERGE_PYTHON), "-c", code, str(cfg_file), str(out)]
    else:
        cfg = mergekit_config(method, inputs, n, weights, args.density, args.lam, args.mergekit_dtype)
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out_shard_params = str(int(parse_bytes(OUT_SHARD) // 2))  # bf16: 2 bytes per parameter
        cmd = [str(mk_exe), str(cfg_file), str(out), "--no-copy-tokenizer", "--quiet",
               "--out-shard-size", out_shard_params]
    cache = work / "evomerge-cache"
    if out.exists():
        shutil.rmtree(out)
    if tool == "evomerge":
        # evomerge hashes its inputs (sha256, for the model card) and remembers the hashes in
        # $EVOMERGE_CACHE. Cold (default): a fresh cache per run, so the hashing a one-off merge
        # pays is counted; warm: hashed once beforehand, so only the merge itself is timed.
        if args.evomerge_hashes == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        elif not cache.exists():
            prehash = ("import sys; from merging.checkpoint import content_hash; "
                       "[content_hash(p) for p in sys.argv[1:]]")
            subprocess.run([str(EVOMERGE_PYTHON), "-c", prehash, *inputs["paths"].values()],
                           env=dict(env, EVOMERGE_CACHE=str(cache)), cwd=str(REPO), check=True)
        env["EVOMERGE_CACHE"] = str(cache)
    warm_cache(inputs["paths"].values())
    print(f"[{method}/{tool}] run {rep + 1}/{args.repeat}: {' '.join(cmd[:3])} ...", flush=True)
    rc, wall, peak, split = run_measured(cmd, log, env)
    if rc != 0:
        r.note, r.ok = f"exit {rc}", False
        print(f"[{method}/{tool}] FAILED (exit {rc}); log {log}:\n{tail(log)}", flush=True)
        return r
    print(f"[{method}/{tool}] {wall:.1f}s (CPU {split['cpu_s']:.1f}s), peak RSS {peak:.2f} GB (sampled peaks: anon "
          f"{split.get('anon', float('nan')):.2f} GB, file-backed {split.get('file', float('nan')):.2f} GB)",
          flush=True)
    if not r.ok or wall < r.seconds:
        r.seconds, r.peak_gb, r.extra = wall, peak, split
    r.ok = True
    return r


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B", text.upper())
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)])


# ----------------------------------------------------------------------------- comparison
def open_folder(d: Path) -> dict[str, Path]:
    """tensor name -> shard file, for a HF folder (sharded with index, or single file)."""
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def compare(a: Path, b: Path, ties_inputs: dict | None = None, density: float = 1.0) -> dict:
    """Max |a - b| and differing elements over all tensors, one tensor at a time.

    With `ties_inputs` (the inputs' description), also counts how many differing elements
    sit where some task vector has an entry whose magnitude equals its k-th largest
    (k = int(density * numel)), i.e. where the top-k selection is ambiguous.
    """
    import torch
    from safetensors import safe_open

    ma, mb = open_folder(a), open_folder(b)
    n_tie = 0
    if ties_inputs:
        src = {n: open_folder(Path(p)) for n, p in ties_inputs["paths"].items()}
    missing = sorted(set(ma) ^ set(mb))
    max_diff, n_diff, n_tot, worst, dtypes = 0.0, 0, 0, "", set()
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name)

    for name in sorted(set(ma) & set(mb)):
        ta, tb = get(ma[name], name), get(mb[name], name)
        dtypes.add((str(ta.dtype).replace("torch.", ""), str(tb.dtype).replace("torch.", "")))
        if ta.shape != tb.shape:
            missing.append(f"{name} (shape {tuple(ta.shape)} vs {tuple(tb.shape)})")
            continue
        d = (ta.float() - tb.float()).abs()
        m = d.max().item() if d.numel() else 0.0
        n_diff += int((d > 0).sum())
        n_tot += d.numel()
        if ties_inputs and m > 0:
            base = get(src["base"][name], name).float()
            k = int(density * base.numel())
            at_tie = torch.zeros(d.shape, dtype=torch.bool)
            for n_, files in src.items():
                if n_ == "base" or k == 0:
                    continue
                tau = (get(files[name], name).float() - base).abs()
                kth = torch.topk(tau.reshape(-1), k, sorted=False).values.min()
                at_tie |= tau == kth
                del tau
            n_tie += int(((d > 0) & at_tie).sum())
            del base, at_tie
        if m > max_diff:
            max_diff, worst = m, name
        del ta, tb, d
    handles.clear()
    return {"max_abs_diff": max_diff, "differing": n_diff, "elements": n_tot, "worst": worst,
            "differing_at_topk_ties": n_tie if ties_inputs else None,
            "mismatched_names": missing, "dtypes": sorted(dtypes)}


# ----------------------------------------------------------------------------- table
def fmt_table(runs: list[Run], comps: dict, inputs: dict) -> str:
    params = f"{inputs['params'] / 1e9:.3f}B"
    gb = f"{inputs['gb_per_model']:.2f} x {len(inputs['paths'])} = {inputs['gb_total']:.2f}"
    head = ["method", "tool", "params", "inputs GB (bf16)", "seconds", "CPU s", "peak RSS GB", "anon / file GB",
            "max |diff|", "differing %", "of which top-k ties", "mk/evo time", "mk/evo mem"]
    rows = []
    by = {(r.method, r.tool): r for r in runs}
    for r in runs:
        c = comps.get(r.method)
        diff = f"{c['max_abs_diff']:.3g}" if c else "-"
        pct = f"{100 * c['differing'] / max(c['elements'], 1):.4f}" if c else "-"
        at = "-"
        if c and c.get("differing_at_topk_ties") is not None:
            at = f"{c['differing_at_topk_ties']}/{c['differing']}"
        rt = rm = "-"
        e = by.get((r.method, "evomerge"))
        if r.tool == "mergekit" and e and e.ok and r.ok:
            rt, rm = f"{r.seconds / e.seconds:.2f}", f"{r.peak_gb / e.peak_gb:.2f}"
        secs = f"{r.seconds:.1f}" if r.ok else f"FAILED ({r.note})"
        peak = f"{r.peak_gb:.2f}" if r.ok else "-"
        cpu = f"{r.extra['cpu_s']:.1f}" if r.ok else "-"
        split = (f"{r.extra.get('anon', float('nan')):.2f} / {r.extra.get('file', float('nan')):.2f}"
                 if r.ok else "-")
        rows.append([r.method, r.tool, params, gb, secs, cpu, peak, split, diff, pct, at, rt, rm])
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(x) for x in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", "--size", dest="params", type=parse_count, default=parse_count("0.5B"),
                    help="model size: 'small' (~10M, quick check) or a count like 500M, 0.5B, 1B (default 0.5B)")
    ap.add_argument("--models", type=int, default=3, help="number of fine-tuned copies (default 3)")
    ap.add_argument("--methods", default="task_arithmetic,ties", help="comma-separated (default both)")
    ap.add_argument("--density", type=float, default=0.5, help="ties density (default 0.5)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="lambda (default 1)")
    ap.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=None,
                    help="comma-separated per-model weights (default 1 each)")
    ap.add_argument("--delta-std", type=float, default=0.002,
                    help="std of the fine-tune perturbations (base weights have std 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "merge_speed",
                    help="work folder for models, outputs, logs (default bench/out/merge_speed)")
    ap.add_argument("--mergekit-venv", type=Path, default=REPO / "bench" / "out" / "venv-mergekit")
    ap.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="mergekit's compute dtype (default float32, as evomerge); output is bf16 either way")
    ap.add_argument("--evomerge-entry", default="api", choices=["api", "cli"],
                    help="run evomerge via `python -c 'merging.merge(...)'` (api) or `evomerge merge` (cli)")
    ap.add_argument("--evomerge-hashes", default="cold", choices=["cold", "warm"],
                    help="cold (default): evomerge hashes its inputs inside the timed run, as a one-off merge "
                         "does; warm: the hashes are computed beforehand and only the merge is timed")
    ap.add_argument("--tools", default="evomerge,mergekit", help="comma-separated subset of evomerge,mergekit")
    ap.add_argument("--repeat", type=int, default=1, help="runs per merge, interleaving the tools; the fastest is reported (its CPU time and memory too)")
    ap.add_argument("--explain-ties", action=argparse.BooleanOptionalAction, default=True,
                    help="for ties, count differing elements that sit at a top-k magnitude tie (re-reads inputs)")
    ap.add_argument("--keep", action="store_true", help="keep generated models and merged outputs")
    args = ap.parse_args(argv)
    if args.weights and len(args.weights) != args.models:
        ap.error("--weights needs one value per model")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]

    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    mk_exe = ensure_mergekit(args.mergekit_venv.resolve()) if "mergekit" in tools else None
    inputs = make_inputs(work / "models", args.params, args.models, args.delta_std, args.seed)
    print(f"[inputs] {inputs['params'] / 1e6:.1f}M params ({inputs['layers']} layers, hidden {inputs['hidden']}), "
          f"{inputs['gb_per_model']:.2f} GB per model on disk, {len(inputs['paths'])} models", flush=True)

    runs: list[Run] = []
    comps: dict[str, dict] = {}
    try:
        for method in methods:
            # repetitions interleave the tools (A B, B A, A B, ...) so that a change in the
            # machine's load during the run does not favour one of them
            mruns: dict[str, Run] = {}
            for rep in range(args.repeat):
                for t in (tools if rep % 2 == 0 else tools[::-1]):
                    mruns[t] = run_tool(t, method, inputs, args, work, mk_exe, mruns.get(t), rep)
            mruns = {t: mruns[t] for t in tools}
            runs += mruns.values()
            if all(t in mruns and mruns[t].ok for t in ("evomerge", "mergekit")):
                t0 = time.perf_counter()
                explain = method == "ties" and args.explain_ties and args.density < 1
                c = compare(mruns["evomerge"].out, mruns["mergekit"].out,
                            inputs if explain else None, args.density)
                comps[method] = c
                print(f"[{method}] compared in {time.perf_counter() - t0:.0f}s: "
                      f"max |diff| {c['max_abs_diff']:.3g} (worst {c['worst']}), "
                      f"{c['differing']}/{c['elements']} elements differ"
                      + (f" ({c['differing_at_topk_ties']} of them where a task vector has a tie at its "
                         f"k-th largest magnitude)" if explain else "")
                      + f"; dtypes {c['dtypes']}"
                      + (f"; name/shape mismatches: {c['mismatched_names'][:5]}" if c["mismatched_names"] else ""),
                      flush=True)
            if not args.keep:
                for r in mruns.values():
                    if r.out and r.out.exists():
                        shutil.rmtree(r.out)
    finally:
        shutil.rmtree(work / "evomerge-cache", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work / "models", ignore_errors=True)

    print()
    print(f"inputs: Llama-shaped, {inputs['params']:,} params, {inputs['layers']} layers, "
          f"1 base + {args.models} fine-tunes (base + N(0, {args.delta_std}) noise), bf16, "
          f"{inputs['shards']} shards/model; ties density {args.density}, lambda {args.lam}, "
          f"weights {args.weights or [1.0] * args.models}; mergekit {MERGEKIT_VERSION} dtype {args.mergekit_dtype} "
          f"-> out_dtype bfloat16; evomerge float32 -> bfloat16 (input hashes {args.evomerge_hashes}); "
          f"{os.cpu_count()} CPUs")
    print(fmt_table(runs, comps, inputs))
    (work / "last_table.md").write_text(fmt_table(runs, comps, inputs) + "\n")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
