#!/usr/bin/env python3
"""Merge speed, peak memory and numerical agreement: evomerge against mergekit and the I/O floor.

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
3. Measures the I/O floor of a merge (see below), best of ``--repeat``, before the merges and
   again after them; every merge's time is then reported as a multiple of it (``x floor``).
4. For each method (all of evomerge's per-tensor methods by default: linear,
   task_arithmetic, ties, dare_linear, dare_ties, tsv) runs, every merge in its own
   subprocess and on the same inputs:
   * evomerge at each ``--threads`` count with read-ahead/write-behind depth ``--pipeline``
     (default 1): ``<repo>/.venv/bin/python -c "from merging import merge;
     merge(spec, out, threads=N, pipeline=D)"`` (or the CLI ``evomerge merge spec.yaml --out DIR
     --threads N`` with ``--evomerge-entry cli``; it has no pipeline option, so runs at a depth other
     than its default 1 use the API); plus one row with
     ``pipeline=0`` (the plain read-merge-write loop) at the last thread count, so that the
     table shows what overlapping the stages buys;
   * mergekit, for the methods it shares (all but tsv, which mergekit 0.1.5 does not have),
     at the same thread counts: ``mergekit-yaml config.yml OUT --no-copy-tokenizer
     --out-shard-size ...`` (CPU; ``--lazy-unpickle`` is not passed because it only affects
     pickled ``.bin`` inputs, and these are safetensors).
   Repetitions interleave the runs (A B C, C B A, ...). Before every merge the input files
   are read once so that every run starts from a warm page cache.
5. Profiles evomerge's stages (see below), once per method and thread count.
6. Compares evomerge's output with mergekit's (both at the last thread count) tensor by tensor
   (``safe_open``, one tensor at a time), and checks that evomerge's outputs at every thread
   count and pipeline depth, and the profile's, are the same bytes (sha256 of the shards).
7. Prints the floor, the table and the stage profile and writes them to
   ``--out/results.md`` and ``--out/results.json``.

What is measured
----------------
* floor: the physical minimum of a merge: reading every input shard file once (base and
  every model; ``readinto`` a reused 16 MiB buffer, unbuffered, page cache warm as for the
  tools) plus writing the output's number of bytes (the merged model's tensors in the output
  dtype, bf16) to a file in the work folder, ``os.fsync``-ed, then deleted. Best of
  ``--repeat`` (read and write of the same repetition), measured in this process.
* seconds: wall time of the merge subprocess, from spawn to exit (interpreter start
  and imports included, for both tools; each CLI / ``-c`` call is one complete merge).
  ``x floor`` = seconds / floor. The notes give each tool's start-up (``import
  merging.engine`` / ``import mergekit.merge`` in a fresh interpreter), which is part of it.
* threads: torch's intra-op threads. ``all`` = torch's default (one per core):
  OMP_NUM_THREADS / MKL_NUM_THREADS are removed from the tools' environment, evomerge gets
  ``threads=None``, mergekit no ``--num-threads``. A number N: both tools run with
  OMP_NUM_THREADS=MKL_NUM_THREADS=N in their environment; evomerge gets ``threads=N``
  (``torch.set_num_threads``), mergekit ``--num-threads N`` (its option, which calls
  ``torch.set_num_threads`` and ``torch.set_num_interop_threads``). evomerge's pipeline
  threads (one reading ahead, one writing behind) are I/O threads beyond that count.
* CPU s: user + system CPU time of that subprocess (``os.wait4``). On a shared machine
  wall time varies with the load of other processes; CPU time much less so.
* peak RSS: the subprocess's own high-water mark of resident memory (``VmHWM`` in
  /proc/<pid>/status, polled every 20 ms; a high-water mark, so only growth in the last 20 ms
  before exit could be missed). Not ``ru_maxrss``: Linux carries the parent's high-water mark
  across fork and exec into the child's ``ru_maxrss``, and this script's own process holds
  gigabytes after building the inputs or comparing outputs. Resident pages of memory-mapped
  input files count, as the kernel counts them.
* anon GB: peak of the subprocess's anonymous resident memory (/proc/<pid>/status RssAnon,
  polled every 20 ms; the file-backed part, RssFile+RssShmem, is in the JSON). File-backed
  pages are memory-mapped input (or output) files: they count in RSS, but the kernel can
  drop them under pressure, so anon is the part that really has to fit in RAM.
* max |diff| vs mergekit: over every tensor of the outputs (both bf16), with the share of
  elements that differ and, for ties (``--explain-ties``, on by default), how many of them
  sit where some task vector has an entry whose magnitude equals its k-th largest, i.e.
  where "keep the top k" does not say which entries to keep. DARE's drop masks are random
  and the tools draw them differently (evomerge by counter-based draws per tensor, model and
  entry, mergekit from torch's global generator), so DARE outputs are compared statistically only: the RMS
  of the update (merged - base) over all tensors, evomerge's divided by mergekit's (1 when
  both scale the kept entries alike), and the cosine between the two updates (about the
  density for independent masks).
* mk/evo time, mk/evo mem: mergekit's time and peak RSS divided by evomerge's at the same
  thread count and the default pipeline (above 1 = evomerge faster / leaner).
* stage profile (evomerge): the engine's stages run one after another (pipeline 0, no
  overlap) in one measured subprocess (``--profile-worker``, in evomerge's venv) with a timer
  around each, summed over tensors, built from the library's own pieces
  (``merging.task_vectors.open_inputs``, ``CheckpointReader.get``, the registered method's
  ``fn``, ``merging.checkpoint.CheckpointWriter``, ``merging.card.model_card``):
  hash (sha256 of the inputs for the model card, as the engine does; cold: a fresh
  $EVOMERGE_CACHE), read (each input's tensor in its stored dtype: ``reader.get(name)``),
  convert (to float32 and the subtractions making the task vectors), method (the registered
  ``fn`` and the engine's finiteness check; for tsv without its SVDs), svd (tsv only:
  ``merging.methods.tsv.tsv_m_factors``, the per-task SVDs and the two orthogonalizations),
  cast (float32 -> output dtype), write (``CheckpointWriter.write`` and ``finish``: the file
  writes, the fsync of each shard, the index, side files and card). The stage with the most
  seconds is named. The profile's output must be the merge's, byte for byte (checked).

Equivalence of parameters (mergekit 0.1.5)
------------------------------------------
* linear: evomerge ``{weights}`` (normalized to sum 1); mergekit ``linear`` with per-model
  ``weight`` and ``normalize: true`` (its default), no ``base_model`` (evomerge's linear is
  the weighted mean of the fine-tunes; it computes base + sum_i c_i tau_i, mergekit
  sum_i w_i theta_i / sum_i w_i, so float32 rounding can differ by an ulp before the bf16 cast).
* task_arithmetic: evomerge ``{weights, lambda}``; mergekit ``task_arithmetic`` with
  per-model ``weight``, ``lambda`` and ``normalize: false`` (its default).
* ties: evomerge ``{density, weights, lambda}``; mergekit ``ties`` with per-model
  ``weight`` and ``density``, ``lambda``, ``normalize: true`` (its default for ties).
  Both trim each task vector to its top ``int(density*numel)`` entries by magnitude
  (up to ties at the boundary, see below),
  elect the sign from the sum of the weighted trimmed vectors (0 counts as +), take
  the disjoint weighted mean and add ``lambda`` times it to the base.
* dare_linear: evomerge ``{density, weights, lambda}`` (seed 0); mergekit ``dare_linear``
  with per-model ``weight`` and ``density``, ``lambda``, ``normalize: false`` and
  ``rescale: true`` (its defaults). Rescaling differs in form: evomerge divides the kept
  entries by the density, mergekit multiplies them by ||tau||_1 / ||kept||_1 (its ``l1``
  rescale), which is 1/density in expectation.
* dare_ties: as dare_linear with mergekit ``dare_ties`` and ``normalize: true`` (not its
  default, false): evomerge's dare_ties takes TIES' disjoint weighted mean, as ties does.
* tsv: evomerge only (``{weights, alpha}``, alpha = ``--lambda``).
* Precision: mergekit computes in its ``dtype`` (inputs are cast to it on load) and
  writes ``out_dtype``. The default here is ``dtype: float32, out_dtype: bfloat16``,
  which matches evomerge (float32 compute, bfloat16 output). ``--mergekit-dtype
  bfloat16`` makes mergekit compute in bf16 instead (its cheaper mode, less exact).
* Known source of differences in ties: entries of a task vector whose magnitude equals
  the k-th largest (common with bf16 inputs, whose task vectors take few distinct
  values). mergekit keeps exactly k entries, choosing among the tied ones by the order of
  an unstable ``torch.argsort`` (implementation-defined); evomerge keeps exactly k as well,
  taking tied entries in index order. The "top-k ties" count checks that every differing
  element lies at such a tie, i.e. that the two tools agree everywhere the definition is
  unambiguous.

How to run
----------
    /work/main/.venv/bin/python bench/merge_speed.py --size small      # ~10M params, quick check
    /work/main/.venv/bin/python bench/merge_speed.py --repeat 2        # ~0.5B params (default)
    /work/main/.venv/bin/python bench/merge_speed.py --params 1B --models 3 --methods ties,tsv

Options: ``--params/--size`` (``small`` or a count such as ``500M``, ``0.5B``, ``1B``),
``--models N`` (fine-tunes, default 3), ``--methods``, ``--density``, ``--lambda``,
``--threads`` (comma list of counts or ``all``, default ``1,all``), ``--pipeline D``
(evomerge's depth, default 1), ``--profile/--no-profile``,
``--out DIR`` (default bench/out/merge_speed), ``--keep`` (keep the generated models and
the merged outputs; by default they are deleted at the end, the mergekit venv is kept),
``--mergekit-dtype``, ``--evomerge-entry {api,cli}``, ``--evomerge-hashes {cold,warm}``
(evomerge sha256-hashes its inputs for the model card and caches the hashes in
$EVOMERGE_CACHE; cold, the default, counts that hashing in the timed run, as a first merge
of new inputs pays it; warm hashes beforehand), ``--repeat R`` (fastest of R runs,
interleaved; the table's ``runs`` says how many were made), ``--repeat-limit S`` (repeat only runs that took
at most S seconds: a TSV merge takes minutes, and its run-to-run noise is small against that), ``--explain-ties/--no-explain-ties``, ``--tools``.
Everything large goes under ``--out`` (bench/out/ is git-ignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVOMERGE_PYTHON = REPO / ".venv" / "bin" / "python"
EVOMERGE_CLI = REPO / ".venv" / "bin" / "evomerge"
CONSTRAINTS = REPO / "constraints.txt"
# 0.1.5 installs cleanly next to torch==2.13.0 (CPU build) with the repo's constraints.
MERGEKIT_VERSION = "0.1.5"
SHARD_BYTES = 500_000_000  # input shard size: a 0.5B bf16 model becomes several shards
OUT_SHARD = "2GB"  # evomerge output shard size; mergekit gets the same in parameters
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv")  # per-tensor methods
DARE = ("dare_linear", "dare_ties")
# What mergekit 0.1.5 needs, besides weight/density/lambda, to compute what evomerge computes.
MERGEKIT_SHARED = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False},
    "ties": {"normalize": True},
    "dare_linear": {"normalize": False, "rescale": True},
    "dare_ties": {"normalize": True, "rescale": True},
}
STAGES = ("hash", "read", "convert", "svd", "method", "cast", "write")
CHUNK = 1 << 24  # 16 MiB: the floor's read and write unit


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


def input_files(inputs: dict) -> list[Path]:
    return [f for p in inputs["paths"].values() for f in sorted(Path(p).glob("*.safetensors"))]


def floor_once(inputs: dict, work: Path, out_bytes: int) -> dict:
    """Reads every input shard once and writes out_bytes fsync-ed (then deletes the file): seconds."""
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    n_read = 0
    for f in input_files(inputs):
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(buf):
                n_read += got
    t_read = time.perf_counter() - t0
    data = memoryview(os.urandom(CHUNK))
    tmp = work / "floor-write.tmp"
    t0 = time.perf_counter()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, data[:min(left, CHUNK)])
        os.fsync(fd)
    finally:
        os.close(fd)
    t_write = time.perf_counter() - t0
    tmp.unlink()
    return {"seconds": t_read + t_write, "read_s": t_read, "write_s": t_write,
            "read_gb": n_read / 1e9, "write_gb": out_bytes / 1e9}


def measure_floor(inputs: dict, work: Path, out_bytes: int, repeat: int) -> dict:
    """The I/O floor, best of `repeat` (page cache warmed first, as before every merge)."""
    best = None
    for _ in range(repeat):
        warm_cache(inputs["paths"].values())
        f = floor_once(inputs, work, out_bytes)
        if best is None or f["seconds"] < best["seconds"]:
            best = f
    print(f"[floor] {best['seconds']:.2f}s = read {best['read_gb']:.2f} GB in {best['read_s']:.2f}s "
          f"({best['read_gb'] / best['read_s']:.1f} GB/s) + write {best['write_gb']:.2f} GB fsync-ed in "
          f"{best['write_s']:.2f}s ({best['write_gb'] / best['write_s']:.1f} GB/s), best of {repeat}", flush=True)
    return best


def startup_seconds(python: Path, module: str, work: Path, repeat: int) -> float:
    """Wall time of a fresh interpreter that only imports `module` (best of `repeat`)."""
    best = float("inf")
    for _ in range(repeat):
        rc, wall, _, _ = run_measured([str(python), "-c", f"import {module}"], work / "startup.log")
        if rc == 0:
            best = min(best, wall)
    return best


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
    """mergekit's config computing what evomerge's `method` computes (see the module docstring)."""
    models = []
    for i in range(n):
        p = {"weight": weights[i]}
        if method in ("ties", *DARE):
            p["density"] = density
        models.append({"model": inputs["paths"][f"m{i}"], "parameters": p})
    params = dict(MERGEKIT_SHARED[method])
    if method != "linear":
        params["lambda"] = lam
    cfg = {"merge_method": method, "models": models, "parameters": params, "dtype": dtype, "out_dtype": "bfloat16"}
    if method != "linear":  # linear is the mean of the fine-tunes: the base takes no part
        cfg["base_model"] = inputs["paths"]["base"]
    return cfg


def evomerge_spec(method: str, inputs: dict, n: int, weights, density, lam) -> dict:
    params: dict = {"weights": list(weights)}
    if method == "tsv":
        params["alpha"] = lam
    elif method != "linear":
        params["lambda"] = lam
    if method in ("ties", *DARE):
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
    threads: str  # "all" (torch's default) or a count
    pipeline: int | None = None  # evomerge's read-ahead/write-behind depth; None for mergekit
    seconds: float = float("nan")
    peak_gb: float = float("nan")
    ok: bool = False
    out: Path | None = None
    log: Path | None = None
    note: str = ""
    digest: str = ""  # sha256 of the output's shards (evomerge)
    n: int = 0  # runs made (the fastest is kept)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method}-{self.tool}-t{self.threads}" + ("" if self.pipeline is None else f"-p{self.pipeline}")


def _sample_rss(pid: int, peaks: dict, stop) -> None:
    """Polls /proc/<pid>/status; keeps VmHWM and the peaks of RssAnon and RssFile (+RssShmem) in GB."""
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            with open(path) as fh:
                vals = {}
                for line in fh:
                    if line.startswith(("VmHWM:", "RssAnon:", "RssFile:", "RssShmem:")):
                        key, kb = line.split()[:2]
                        vals[key[:-1]] = int(kb) * 1024 / 1e9
        except (OSError, ValueError):
            return
        if vals:
            peaks["hwm"] = max(peaks.get("hwm", 0.0), vals.get("VmHWM", 0.0))
            peaks["anon"] = max(peaks.get("anon", 0.0), vals.get("RssAnon", 0.0))
            peaks["file"] = max(peaks.get("file", 0.0), vals.get("RssFile", 0.0) + vals.get("RssShmem", 0.0))
        stop.wait(0.02)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float, dict]:
    """Runs cmd; returns (exit code, wall seconds, peak RSS in GB, sampled peaks) of that subprocess.

    Peak RSS is the child's own high-water mark (VmHWM of the program it exec'd, a fresh address
    space), read every 20 ms: exact but for growth in the last 20 ms before exit. The kernel's
    ru_maxrss is not used for it (it is kept in the peaks as ``ru_maxrss``): across fork and
    exec Linux carries the parent's high-water mark into the child's, so a child of a process
    that once held gigabytes (this one, after building the inputs or comparing outputs) reports
    at least that. The sampled peaks split the resident memory into anonymous (heap: tensors
    being computed) and file-backed pages (memory-mapped inputs, reclaimable by the kernel);
    they are polled every 20 ms too and can miss short spikes.
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
    peaks["ru_maxrss"] = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux
    return proc.returncode, wall, peaks.get("hwm", peaks["ru_maxrss"]), peaks


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def base_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def thread_env(env: dict, threads: str) -> dict:
    """`threads` in the environment: OMP/MKL_NUM_THREADS=N, or unset for all (torch's default)."""
    env = dict(env)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if threads == "all":
            env.pop(var, None)
        else:
            env[var] = threads
    return env


def hash_cache(env: dict, args, work: Path, inputs: dict) -> dict:
    """$EVOMERGE_CACHE for one evomerge run. evomerge hashes its inputs (sha256, for the model card)
    and remembers the hashes there. Cold (default): a fresh cache per run, so the hashing a one-off
    merge pays is counted; warm: hashed once beforehand, so only the merge itself is timed."""
    cache = work / "evomerge-cache"
    if args.evomerge_hashes == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    elif not cache.exists():
        prehash = ("import sys; from merging.checkpoint import content_hash; "
                   "[content_hash(p) for p in sys.argv[1:]]")
        subprocess.run([str(EVOMERGE_PYTHON), "-c", prehash, *inputs["paths"].values()],
                       env=dict(env, EVOMERGE_CACHE=str(cache)), cwd=str(REPO), check=True)
    return dict(env, EVOMERGE_CACHE=str(cache))


def output_digest(d: Path) -> str:
    """sha256 over an output folder's safetensors shards (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(Path(d).glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def plan_runs(method: str, tools: list[str], threads: list[str], pipeline: int, work: Path) -> list[Run]:
    """The runs of one method: each tool at each thread count, and evomerge unpipelined at the last."""
    runs = []
    for th in threads:
        if "evomerge" in tools:
            runs.append(Run(method, "evomerge", th, pipeline))
        if "mergekit" in tools and method in MERGEKIT_SHARED:
            runs.append(Run(method, "mergekit", th))
    if "evomerge" in tools and pipeline != 0:
        runs.append(Run(method, "evomerge", threads[-1], 0))
    for r in runs:
        r.out, r.log = work / f"out-{r.label}", work / f"{r.label}.log"
    return runs


def merge_command(r: Run, inputs: dict, args, work: Path, mk_exe: Path | None) -> list[str]:
    import yaml

    n = args.models
    weights = args.weights or [1.0] * n
    cfg_file = work / f"{r.label}.{'json' if r.tool == 'evomerge' and args.evomerge_entry == 'api' else 'yml'}"
    if r.tool == "mergekit":
        cfg = mergekit_config(r.method, inputs, n, weights, args.density, args.lam, args.mergekit_dtype)
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out_shard_params = str(int(parse_bytes(OUT_SHARD) // 2))  # bf16: 2 bytes per parameter
        threads = [] if r.threads == "all" else ["--num-threads", r.threads]
        return [str(mk_exe), str(cfg_file), str(r.out), "--no-copy-tokenizer", "--quiet",
                "--out-shard-size", out_shard_params, *threads]
    spec = evomerge_spec(r.method, inputs, n, weights, args.density, args.lam)
    if args.evomerge_entry == "cli" and r.pipeline == args.pipeline == 1:
        cfg_file.write_text(yaml.safe_dump({"kind": "merge", **spec}, sort_keys=False))
        threads = [] if r.threads == "all" else ["--threads", r.threads]
        return [str(EVOMERGE_CLI), "merge", str(cfg_file), "--out", str(r.out), *threads]
    cfg_file.write_text(json.dumps(spec, indent=2))
    code = ("import json, sys; from merging import merge; "
            "t = None if sys.argv[3] == 'all' else int(sys.argv[3]); "
            "merge(json.load(open(sys.argv[1])), sys.argv[2], threads=t, pipeline=int(sys.argv[4]))")
    return [str(EVOMERGE_PYTHON), "-c", code, str(cfg_file), str(r.out), r.threads, str(r.pipeline)]


def run_tool(r: Run, inputs: dict, args, work: Path, mk_exe: Path | None, rep: int = 0) -> Run:
    """One merge, measured; keeps the fastest of the repetitions in `r`."""
    if r.note:  # an earlier repetition failed
        return r
    cmd = merge_command(r, inputs, args, work, mk_exe)
    env = thread_env(base_env(), r.threads)
    if r.tool == "evomerge":
        env = hash_cache(env, args, work, inputs)
    if r.out.exists():
        shutil.rmtree(r.out)
    warm_cache(inputs["paths"].values())
    load = os.getloadavg()[0]
    tag = f"[{r.method}/{r.tool} threads={r.threads}" + ("" if r.pipeline is None else f" pipeline={r.pipeline}") + "]"
    print(f"{tag} run {rep + 1}/{args.repeat} (load {load:.1f}): {' '.join(cmd[:3])} ...", flush=True)
    rc, wall, peak, split = run_measured(cmd, r.log, env)
    if rc != 0:
        r.note, r.ok = f"exit {rc}", False
        print(f"{tag} FAILED (exit {rc}); log {r.log}:\n{tail(r.log)}", flush=True)
        return r
    print(f"{tag} {wall:.1f}s (CPU {split['cpu_s']:.1f}s), peak RSS {peak:.2f} GB (sampled peaks: anon "
          f"{split.get('anon', float('nan')):.2f} GB, file-backed {split.get('file', float('nan')):.2f} GB)",
          flush=True)
    split["load_before"] = load
    if r.tool == "evomerge" and not r.digest:
        r.digest = output_digest(r.out)
    if not r.ok or wall < r.seconds:
        r.seconds, r.peak_gb, r.extra = wall, peak, split
    r.ok, r.n = True, r.n + 1
    return r


# ----------------------------------------------------------------------------- stage profile
def profile_worker(spec_file: str, out_dir: str, threads: str, result_file: str) -> None:
    """The engine's stages for one merge, one after another, with a timer around each (summed over
    tensors); writes {"stages": {stage: seconds}, ...} to `result_file`. Runs in evomerge's venv
    (`run_profile`); does what `merging.engine.merge` does at pipeline 0, from the same pieces."""
    sys.path.insert(0, str(REPO))
    import torch

    from core.devices import DTYPES
    from core.hashing import content_hash
    from merging.card import model_card
    from merging.checkpoint import CheckpointWriter
    from merging.engine import all_finite, torch_threads
    from merging.methods import get_method
    from merging.methods import tsv as tsv_module
    from merging.spec import MergeSpec
    from merging.task_vectors import open_inputs

    spent = dict.fromkeys(STAGES, 0.0)

    def timed(stage: str, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        spent[stage] += time.perf_counter() - t0
        return out

    factors = tsv_module.tsv_m_factors  # TSV-M's SVDs and orthogonalizations, timed apart
    tsv_module.tsv_m_factors = lambda taus: timed("svd", factors, taus)

    t_start = time.perf_counter()
    spec = MergeSpec.model_validate(json.loads(Path(spec_file).read_text()))
    paths = [spec.base, *[m.path for m in spec.models]]
    with torch_threads(None if threads == "all" else int(threads)):
        n_threads = torch.get_num_threads()
        reader, sources = open_inputs(spec.base, [m.path for m in spec.models])
        hashes = timed("hash", lambda: {str(p): content_hash(p) for p in paths})
        fn, params = get_method(spec.method).fn, spec.method_params()
        infos = {n: reader.info(n) for n in reader.names()}
        def read(name: str) -> list:  # each input's tensor in its stored dtype
            return [reader.get(name)] + [s.reader.get(name) for s in sources]

        def convert(raw: list) -> tuple:  # float32, and the task vectors
            base = raw[0].to(torch.float32)
            return base, [torch.sub(t, base) for t in raw[1:]]  # as ModelSource.delta: promoted in the subtraction

        with CheckpointWriter(out_dir, infos, DTYPES[spec.output.dtype], spec.output.max_shard_size) as writer:
            for name in writer.expected:
                raw = timed("read", read, name)
                if not infos[name].dtype.is_floating_point:
                    timed("write", writer.write, name, raw[0])
                    continue
                base, deltas = timed("convert", convert, raw)
                del raw
                svd_before, t0 = spent["svd"], time.perf_counter()
                merged = fn(base, deltas, params, name)
                if not all_finite(merged):
                    raise SystemExit(f"{name}: non-finite merge")
                spent["method"] += time.perf_counter() - t0 - (spent["svd"] - svd_before)
                del base, deltas
                out = timed("cast", merged.to, writer.dtype_of[name])
                del merged
                timed("write", writer.write, name, out)
                del out
            timed("write", writer.finish, spec.base, model_card(spec, hashes))
    Path(result_file).write_text(json.dumps({"stages": spent, "tensors": len(infos), "torch_threads": n_threads,
                                             "in_process_s": time.perf_counter() - t_start}))


def run_profile(method: str, threads: str, inputs: dict, args, work: Path) -> dict:
    """The stage profile of one evomerge merge in its own measured subprocess."""
    label = f"{method}-profile-t{threads}"
    spec_file, out, result, log = (work / f"{label}.json", work / f"out-{label}", work / f"{label}.result.json",
                                   work / f"{label}.log")
    weights = args.weights or [1.0] * args.models
    spec_file.write_text(json.dumps(evomerge_spec(method, inputs, args.models, weights, args.density, args.lam)))
    if out.exists():
        shutil.rmtree(out)
    env = hash_cache(thread_env(base_env(), threads), args, work, inputs)
    warm_cache(inputs["paths"].values())
    cmd = [str(EVOMERGE_PYTHON), str(Path(__file__).resolve()), "--profile-worker",
           str(spec_file), str(out), threads, str(result)]
    print(f"[{method}/profile threads={threads}] ...", flush=True)
    rc, wall, peak, split = run_measured(cmd, log, env)
    if rc != 0:
        print(f"[{method}/profile] FAILED (exit {rc}); log {log}:\n{tail(log)}", flush=True)
        return {"method": method, "threads": threads, "ok": False, "note": f"exit {rc}"}
    prof = json.loads(result.read_text())
    prof.update(method=method, threads=threads, ok=True, seconds=wall, cpu_s=split["cpu_s"], peak_gb=peak,
                digest=output_digest(out))
    st = prof["stages"]
    prof["dominant"] = max(st, key=st.get)
    print(f"[{method}/profile threads={threads}] {wall:.1f}s: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in st.items() if v or k != "svd")
          + f"; dominant: {prof['dominant']}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return prof


# ----------------------------------------------------------------------------- comparison
def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B", text.upper())
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)])


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


def compare_updates(a: Path, b: Path, base: Path) -> dict:
    """For randomized merges (DARE): the RMS of each output's update (merged - base) over all
    tensors, their ratio (a over b) and the cosine between the two updates."""
    from safetensors import safe_open

    ma, mb, m0 = open_folder(a), open_folder(b), open_folder(base)
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(name).double()

    saa = sbb = sab = 0.0
    n = 0
    for name in sorted(set(ma) & set(mb) & set(m0)):
        t0 = get(m0[name], name)
        da, db = get(ma[name], name) - t0, get(mb[name], name) - t0
        saa, sbb, sab = saa + float((da * da).sum()), sbb + float((db * db).sum()), sab + float((da * db).sum())
        n += da.numel()
        del t0, da, db
    handles.clear()
    rms_a, rms_b = math.sqrt(saa / max(n, 1)), math.sqrt(sbb / max(n, 1))
    return {"rms_update_a": rms_a, "rms_update_b": rms_b, "rms_ratio": rms_a / rms_b if rms_b else float("nan"),
            "cosine": sab / math.sqrt(saa * sbb) if saa and sbb else float("nan"), "elements": n}


def diff_cell(c: dict | None) -> str:
    """The table's 'max |diff| vs mergekit' cell."""
    if not c:
        return "-"
    if "rms_ratio" in c:
        return f"random masks: update RMS evo/mk {c['rms_ratio']:.3f}, cosine {c['cosine']:.2f}"
    pct = 100 * c["differing"] / max(c["elements"], 1)
    text = f"{c['max_abs_diff']:.3g} ({pct:.4f}% differ"
    if c.get("differing_at_topk_ties") is not None and c["differing"]:
        text += f", {c['differing_at_topk_ties']}/{c['differing']} at top-k ties"
    return text + ")"


# ----------------------------------------------------------------------------- table
def md_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(x) for x in rows])


def fmt_table(runs: list[Run], comps: dict, floor_s: float, pipeline: int) -> str:
    head = ["method", "tool", "threads", "pipeline", "runs", "seconds", "x floor", "CPU s", "peak RSS GB", "anon GB",
            "mk/evo time", "mk/evo mem", "max |diff| vs mergekit"]
    by = {(r.method, r.tool, r.threads, r.pipeline): r for r in runs}
    rows = []
    for r in runs:
        rt = rm = "-"
        e = by.get((r.method, "evomerge", r.threads, pipeline))
        if r.tool == "mergekit" and e and e.ok and r.ok:
            rt, rm = f"{r.seconds / e.seconds:.2f}", f"{r.peak_gb / e.peak_gb:.2f}"
        ok = r.ok
        diff = diff_cell(comps.get(r.method)) if r.tool == "mergekit" else "-"
        rows.append([r.method, r.tool, r.threads, "-" if r.pipeline is None else str(r.pipeline), str(r.n),
                     f"{r.seconds:.1f}" if ok else f"FAILED ({r.note})",
                     f"{r.seconds / floor_s:.2f}" if ok else "-",
                     f"{r.extra['cpu_s']:.1f}" if ok else "-",
                     f"{r.peak_gb:.2f}" if ok else "-",
                     f"{r.extra.get('anon', float('nan')):.2f}" if ok else "-", rt, rm, diff])
    return md_table(head, rows)


def fmt_profile(profiles: list[dict], floor_s: float) -> str:
    head = ["method", "threads", *STAGES, "sum of stages", "wall s", "x floor", "dominant"]
    rows = []
    for p in profiles:
        if not p["ok"]:
            rows.append([p["method"], p["threads"], *["-"] * len(STAGES), "-", f"FAILED ({p['note']})", "-", "-"])
            continue
        st = p["stages"]
        rows.append([p["method"], p["threads"], *[f"{st[s]:.2f}" if s != "svd" or p["method"] == "tsv" else "-"
                                                  for s in STAGES],
                     f"{sum(st.values()):.2f}", f"{p['seconds']:.1f}", f"{p['seconds'] / floor_s:.2f}",
                     f"{p['dominant']} ({100 * st[p['dominant']] / max(sum(st.values()), 1e-9):.0f}%)"])
    return md_table(head, rows)


# ----------------------------------------------------------------------------- main
def parse_threads(text: str) -> list[str]:
    out = []
    for t in (x.strip() for x in text.split(",") if x.strip()):
        if t != "all" and not (t.isdigit() and int(t) >= 1):
            raise argparse.ArgumentTypeError(f"--threads {text!r}: use counts >= 1 or 'all', e.g. 1,all")
        out.append(t)
    return out


def check_same_bytes(runs: list[Run], profiles: list[dict]) -> str:
    """Whether evomerge's outputs (every thread count and pipeline depth, and the profile's) match."""
    digests = {r.label: r.digest for r in runs if r.tool == "evomerge" and r.ok}
    digests.update({f"profile-t{p['threads']}": p["digest"] for p in profiles if p["ok"]})
    if len(digests) < 2:
        return "n/a"
    return "yes" if len(set(digests.values())) == 1 else "NO: " + ", ".join(f"{k} {v[:8]}" for k, v in digests.items())


def notes_text(args, inputs: dict, floor: dict, floors: list[dict], startup: dict, loads: list[float]) -> str:
    return (
        f"inputs: Llama-shaped, {inputs['params']:,} params, {inputs['layers']} layers, hidden {inputs['hidden']}, "
        f"1 base + {args.models} fine-tunes (base + N(0, {args.delta_std}) noise), bf16, {inputs['shards']} shards/model, "
        f"{inputs['gb_total']:.2f} GB read per merge; density {args.density}, lambda/alpha {args.lam}, "
        f"weights {args.weights or [1.0] * args.models}; mergekit {MERGEKIT_VERSION} dtype {args.mergekit_dtype} "
        f"-> out_dtype bfloat16; evomerge float32 -> bfloat16 (input hashes {args.evomerge_hashes}, "
        f"entry {args.evomerge_entry}); best of {args.repeat}.\n"
        f"machine: {os.cpu_count()} CPUs, 1-min load average {min(loads):.1f}-{max(loads):.1f} before the runs "
        f"(above 0 means other processes were running).\n"
        f"floor: {floor['seconds']:.2f}s (read {floor['read_gb']:.2f} GB in {floor['read_s']:.2f}s + write "
        f"{floor['write_gb']:.2f} GB with fsync in {floor['write_s']:.2f}s); measured before the merges "
        f"{floors[0]['seconds']:.2f}s, after {floors[-1]['seconds']:.2f}s; x floor uses the lower.\n"
        f"start-up (fresh interpreter, imports only, part of every merge's seconds): "
        + ", ".join(f"{k} {v:.1f}s" for k, v in startup.items()) + "."
    )


def write_report(work: Path, args, inputs: dict, floors: list[dict], startup: dict, loads: list[float],
                 runs: list[Run], comps: dict, profiles: list[dict], same: dict, final: bool) -> None:
    """Writes results.md and results.json (after each method, so that an interrupted run leaves
    what it measured); the final report is also printed."""
    floor = min(floors, key=lambda f: f["seconds"])
    notes = notes_text(args, inputs, floor, floors, startup, loads)
    if not final:
        notes += "\n(partial: written after each method; the run has not finished)"
    table = fmt_table(runs, comps, floor["seconds"], args.pipeline)
    prof = fmt_profile(profiles, floor["seconds"]) if profiles else ""
    same_line = "evomerge's outputs identical (sha256) at every thread count and pipeline depth and in the profile: " \
        + "; ".join(f"{m} {v}" for m, v in same.items())
    report = "\n\n".join(x for x in [notes, table, ("Stage profile (evomerge, pipeline 0, seconds summed over "
                                                    "tensors):\n\n" + prof) if prof else "", same_line] if x)
    (work / "results.md").write_text(report + "\n")
    (work / "results.json").write_text(json.dumps({
        "final": final, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "inputs": {k: v for k, v in inputs.items() if k != "stamp"}, "floor": floor, "floors": floors,
        "startup_s": startup, "load_averages": loads, "runs": [
            {**asdict(r), "out": str(r.out), "log": str(r.log), "x_floor": r.seconds / floor["seconds"]}
            for r in runs],
        "comparisons": comps, "profiles": profiles, "same_bytes": same}, indent=2, default=str))
    if final:
        print()
        print(report)
        print(f"\nwritten: {work / 'results.md'}, {work / 'results.json'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", "--size", dest="params", type=parse_count, default=parse_count("0.5B"),
                    help="model size: 'small' (~10M, quick check) or a count like 500M, 0.5B, 1B (default 0.5B)")
    ap.add_argument("--models", type=int, default=3, help="number of fine-tuned copies (default 3)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    ap.add_argument("--density", type=float, default=0.5, help="ties/DARE density (default 0.5)")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="lambda, and tsv's alpha (default 1)")
    ap.add_argument("--weights", type=lambda s: [float(x) for x in s.split(",")], default=None,
                    help="comma-separated per-model weights (default 1 each)")
    ap.add_argument("--threads", type=parse_threads, default=parse_threads("1,all"),
                    help="comma-separated torch thread counts, a number or 'all' (default 1,all)")
    ap.add_argument("--pipeline", type=int, default=1,
                    help="evomerge's read-ahead/write-behind depth (default 1); a row at 0 is added")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="profile evomerge's stages per method and thread count (default on)")
    ap.add_argument("--delta-std", type=float, default=0.002,
                    help="std of the fine-tune perturbations (base weights have std 0.02)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "merge_speed",
                    help="work folder for models, outputs, logs (default bench/out/merge_speed)")
    ap.add_argument("--mergekit-venv", type=Path, default=REPO / "bench" / "out" / "venv-mergekit")
    ap.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="mergekit's compute dtype (default float32, as evomerge); output is bf16 either way")
    ap.add_argument("--evomerge-entry", default="api", choices=["api", "cli"],
                    help="run evomerge via `python -c 'merging.merge(...)'` (api) or `evomerge merge` (cli; "
                         "runs at a pipeline other than 1 use the api)")
    ap.add_argument("--evomerge-hashes", default="cold", choices=["cold", "warm"],
                    help="cold (default): evomerge hashes its inputs inside the timed run, as a one-off merge "
                         "does; warm: the hashes are computed beforehand and only the merge is timed")
    ap.add_argument("--tools", default="evomerge,mergekit", help="comma-separated subset of evomerge,mergekit")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per merge (and floor measurements), interleaved; the fastest is reported "
                         "(its CPU time and memory too)")
    ap.add_argument("--repeat-limit", type=float, default=math.inf,
                    help="repeat only runs whose first run took at most this many seconds (default: all)")
    ap.add_argument("--explain-ties", action=argparse.BooleanOptionalAction, default=True,
                    help="for ties, count differing elements that sit at a top-k magnitude tie (re-reads inputs)")
    ap.add_argument("--keep", action="store_true", help="keep generated models and merged outputs")
    ap.add_argument("--profile-worker", nargs=4, metavar=("SPEC", "OUT", "THREADS", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile_worker:
        profile_worker(*args.profile_worker)
        return 0
    if args.weights and len(args.weights) != args.models:
        ap.error("--weights needs one value per model")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: {', '.join(unknown)} not among {', '.join(METHODS)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]

    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    mk_venv = args.mergekit_venv.resolve()
    mk_exe = ensure_mergekit(mk_venv) if "mergekit" in tools else None
    inputs = make_inputs(work / "models", args.params, args.models, args.delta_std, args.seed)
    print(f"[inputs] {inputs['params'] / 1e6:.1f}M params ({inputs['layers']} layers, hidden {inputs['hidden']}), "
          f"{inputs['gb_per_model']:.2f} GB per model on disk, {len(inputs['paths'])} models", flush=True)
    out_bytes = 2 * inputs["params"]  # every tensor is floating: all bf16 in the output

    runs: list[Run] = []
    comps: dict[str, dict] = {}
    profiles: list[dict] = []
    same: dict[str, str] = {}
    loads = [os.getloadavg()[0]]
    try:
        startup = {"evomerge": startup_seconds(EVOMERGE_PYTHON, "merging.engine", work, args.repeat)}
        if mk_exe:
            startup["mergekit"] = startup_seconds(mk_venv / "bin" / "python", "mergekit.merge", work, args.repeat)
        floors = [measure_floor(inputs, work, out_bytes, args.repeat)]
        for method in methods:
            mruns = plan_runs(method, tools, args.threads, args.pipeline, work)
            for rep in range(args.repeat):
                for r in (mruns if rep % 2 == 0 else mruns[::-1]):
                    if rep and r.ok and r.seconds > args.repeat_limit:
                        continue  # a long run: its noise is small against it
                    loads.append(os.getloadavg()[0])
                    run_tool(r, inputs, args, work, mk_exe, rep)
            runs += mruns
            mprof = [run_profile(method, th, inputs, args, work) for th in args.threads] \
                if args.profile and "evomerge" in tools else []
            profiles += mprof
            same[method] = check_same_bytes(mruns, mprof)
            print(f"[{method}] evomerge's outputs the same bytes at every thread count and pipeline depth: "
                  f"{same[method]}", flush=True)
            by = {(r.tool, r.threads, r.pipeline): r for r in mruns}
            evo = by.get(("evomerge", args.threads[-1], args.pipeline))
            mk = by.get(("mergekit", args.threads[-1], None))
            if evo and mk and evo.ok and mk.ok:
                t0 = time.perf_counter()
                if method in DARE:
                    c = compare_updates(evo.out, mk.out, Path(inputs["paths"]["base"]))
                else:
                    explain = method == "ties" and args.explain_ties and args.density < 1
                    c = compare(evo.out, mk.out, inputs if explain else None, args.density)
                comps[method] = c
                print(f"[{method}] compared in {time.perf_counter() - t0:.0f}s: {diff_cell(c)}"
                      + (f"; worst {c['worst']}; dtypes {c['dtypes']}" if "worst" in c else "")
                      + (f"; name/shape mismatches: {c['mismatched_names'][:5]}" if c.get("mismatched_names") else ""),
                      flush=True)
            if not args.keep:
                for r in mruns:
                    if r.out and r.out.exists():
                        shutil.rmtree(r.out)
            write_report(work, args, inputs, floors, startup, loads, runs, comps, profiles, same, final=False)
        floors.append(measure_floor(inputs, work, out_bytes, args.repeat))
    finally:
        shutil.rmtree(work / "evomerge-cache", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work / "models", ignore_errors=True)

    write_report(work, args, inputs, floors, startup, loads, runs, comps, profiles, same, final=True)
    return 0 if all(r.ok for r in runs) and all(p["ok"] for p in profiles) else 1


if __name__ == "__main__":
    sys.exit(main())
