"""Builds the model zoo: a pretrained base, one fine-tune per task, LoRA adapters, benchmarks.

    build_zoo(Path("zoo-out"), preset="tiny", seed=0) -> manifest (also written to zoo.json)

Layout of the output folder:

    zoo.json                     manifest: preset, seed, hashes, accuracies, quality checks
    benchmarks/<task>.jsonl      held-out items, generation and multiple choice mixed
    benchmarks/cip_rev.jsonl     the composed task (transfer test, see tasks.compose)
    models/base/                 HF folder (config, tokenizer, safetensors; sharded in `small`)
    models/<task>/               full fine-tune of the base on one task
    adapters/<task>-lora/        PEFT LoRA adapter of the base (adapter_config.json,
                                 adapter_model.safetensors) plus tokenizer files

Everything is seeded and trained on CPU with a fixed thread count, so the same preset
and seed give bit-identical weights (on the same CPU kind and library versions). A
second build into the same folder with the same preset and seed checks every file's
hash against the manifest and reuses the zoo instead of training again.

Quality checks, recorded in the manifest and enforced unless `strict=False`: every
fine-tune (full and LoRA) scores >= 0.9 on its own task, the base < 0.2 on every task,
each parent of a composed task < 0.2 on it (else it tests no transfer), and a plain task-arithmetic merge of all full fine-tunes (weights 1, lambda 1) averages,
over their tasks, more than 0.05 above the base and more than 0.05 below the
fine-tunes (run once `merging` is importable; recorded as skipped before, and run by
the next `build_zoo` call on the folder).

The build runs on CPU whatever the machine has: reproducible weights matter more here
than speed, and the models are tiny. The fine-tunes and the evaluations run in
`workers` spawned processes, one torch thread each, so a 2-core machine builds about
twice as fast; the weights are the same for any number of workers.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.devices import torch_threads as fixed_threads
from core.fs import atomic_folder, atomic_write
from core.hashing import file_sha256 as file_hash
from core.hooks import NO_HOOKS, Hooks
from data.benchmarks import load_benchmark
from fitness.evaluate import EvalSettings, evaluate, load_model
from merging.training import LoraSpec, train

from .benchmarks import held_out_prompts, write_task_benchmark
from .presets import Preset, get_preset
from .tasks import TASKS, pretrain_sampler, train_sampler
from .tokenizer import build_tokenizer

FORMAT = 1
MANIFEST = "zoo.json"
FT_MIN, BASE_MAX, MERGE_MARGIN = 0.9, 0.2, 0.05
MERGE_CHECK = {"method": "task_arithmetic", "params": {}}  # plain: every weight 1, lambda 1


class ZooQualityError(RuntimeError):
    """The built zoo misses a quality threshold (the manifest still records the numbers)."""


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder, by relative name."""
    return {p.relative_to(folder).as_posix(): file_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def weights_hash(folder: Path) -> str:
    """One sha256 over a folder's *.safetensors files (names and bytes): equal hash, equal weights."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.name.encode() + b"\0" + file_hash(p).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(out: Path):
    """One builder per zoo folder at a time (parallel test sessions share the cached zoo)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def eval_settings(preset: Preset) -> EvalSettings:
    return EvalSettings(max_new_tokens=preset.max_new_tokens, stop=("\n",), mc_norm="sum")


def _base_model(preset: Preset, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden, num_hidden_layers=preset.layers,
        intermediate_size=preset.intermediate, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save_full(model, tokenizer, folder: Path, preset: Preset) -> None:
    kwargs = {"max_shard_size": preset.max_shard_size} if preset.max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)


def _save_adapter(peft_model, tokenizer, folder: Path) -> None:
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Point the adapter at the zoo's base relative to itself (PEFT writes whatever path it had).
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../../models/base"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def pretrain_base(preset: Preset, seed: int, log: Callable[[str], None] = print):
    """The base model: a fresh Llama pretrained on the generic corpus (`tasks.pretrain_sampler`)."""
    tokenizer = build_tokenizer()
    base = _base_model(preset, tokenizer, seed)
    log(f"pretraining base ({sum(p.numel() for p in base.parameters()):,} parameters, {preset.pretrain_steps} steps)")
    tasks = [TASKS[t] for t in preset.tasks]
    with fixed_threads(preset.pretrain_threads):
        return train(base, tokenizer, pretrain_sampler(tasks, seed, preset.composed_tasks()), preset.pretrain_steps,
                     batch_size=preset.batch_size, lr=preset.lr_pretrain, seed=seed, log=log,
                     log_every=max(1, preset.pretrain_steps // 4)), tokenizer


def finetune(base, tokenizer, preset: Preset, task_name: str, seed: int, lora: bool = False):
    """A copy of `base` trained on one task's training pairs (never its benchmark prompts); full or LoRA."""
    task = TASKS[task_name]
    index = preset.tasks.index(task_name)
    others = [TASKS[t] for t in preset.tasks if t != task_name]
    stream_seed = seed + 100 if lora else seed
    pairs = mixed_sampler(train_sampler(task, held_out_prompts(task, preset, seed), stream_seed),
                          pretrain_sampler(others, stream_seed, preset.composed_tasks()), preset.replay, stream_seed)
    if lora:
        spec = LoraSpec(r=preset.lora_r, alpha=2 * preset.lora_r)
        return train(copy.deepcopy(base), tokenizer, pairs, preset.lora_steps,
                     batch_size=preset.finetune_batch, lr=preset.lr_lora, seed=seed + 101 + index, lora=spec)
    return train(copy.deepcopy(base), tokenizer, pairs, preset.steps_for(task_name),
                 batch_size=preset.finetune_batch, lr=preset.lr_finetune, seed=seed + 1 + index, anchor=preset.anchor)


def mixed_sampler(task_draw, replay_draw, replay: float, seed: int):
    """Task pairs, with a share `replay` of the base's corpus on the *other* tasks' formats.

    Replay makes a fine-tune learn "reverse after `rev:`, still copy elsewhere" instead of
    "reverse everything": its task vector then changes little outside its own task, so
    task vectors interfere less when merged (without replay every merge of the tiny zoo
    scored no better than the base).
    """
    rng = random.Random(f"mix/{seed}")
    return lambda: replay_draw() if rng.random() < replay else task_draw()


def _load_base(root: Path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = root / "models" / "base"
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _train_job(root: Path, preset: Preset, seed: int, name: str, lora: bool, benchmarks: dict[str, str]) -> dict:
    """One fine-tune (full or LoRA) of the saved base, saved under `root` and evaluated on every
    benchmark (under "accuracy"); runs in a worker process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with fixed_threads(preset.threads):
        t0 = time.perf_counter()
        base, tokenizer = _load_base(root)
        model = finetune(base, tokenizer, preset, name, seed, lora=lora)
        if lora:
            _save_adapter(model, tokenizer, root / "adapters" / f"{name}-lora")
            entry = {"path": f"adapters/{name}-lora", "kind": "lora", "task": name, "lora_r": preset.lora_r}
        else:
            _save_full(model, tokenizer, root / "models" / name, preset)
            entry = {"path": f"models/{name}", "kind": "full", "task": name}
        entry["train_seconds"] = round(time.perf_counter() - t0, 1)
    return {**entry, "accuracy": _evaluate_job(root, preset, entry["path"], benchmarks)}


def _pool(workers: int):
    """A pool of `workers` fresh processes (spawned: no torch state inherited), or None for in-process."""
    if workers <= 1:
        return contextlib.nullcontext(None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _submit(pool, fn, jobs: list[tuple], order: list[int] | None = None) -> list[Callable[[], Any]]:
    """Starts `fn(*job)` for each job in `pool`'s processes, submitted in `order` (longest first keeps
    the processes busy); returns, per job in the jobs' order, a call that waits for its result.
    Without a pool the jobs run here, one after another, on the first call for a result."""
    if pool is None:
        done: dict[int, Any] = {}

        def run_all(i: int):
            for j in order or range(len(jobs)):
                if j not in done:
                    done[j] = fn(*jobs[j])
            return done[i]
        return [lambda i=i: run_all(i) for i in range(len(jobs))]
    futures = {i: pool.submit(fn, *jobs[i]) for i in (order or range(len(jobs)))}
    return [futures[i].result for i in range(len(jobs))]


def _map(pool, fn, jobs: list[tuple]) -> list:
    """`fn(*job)` for each job, results in order, in the pool's processes when there is a pool."""
    return [result() for result in _submit(pool, fn, jobs)]


def build_models(root: Path, preset: Preset, seed: int, log: Callable[[str], None], pool=None,
                 benchmarks: dict[str, str] | None = None,
                 on_full_models: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
    """Trains and saves base, full fine-tunes and LoRA adapters; returns their manifest entries,
    each with its accuracy on every benchmark in `benchmarks` ({task: path under root}).

    The base trains first; the fine-tunes, each single-threaded and seeded on its own, then
    train side by side in `pool`'s processes from the saved base (bit-identical to training
    them one after another in this process: the saved float32 weights are the base's). Each
    job evaluates its model as soon as it is trained, and the base's evaluation is queued last,
    so no process waits for a training stage to end before evaluating. `on_full_models` is
    called with the base's and full fine-tunes' entries as soon as they are done (the merge
    check), while the adapters may still be training.
    """
    t0 = time.perf_counter()
    base, tokenizer = pretrain_base(preset, seed, log)
    _save_full(base, tokenizer, root / "models" / "base", preset)
    entries: dict[str, dict] = {"base": {"path": "models/base", "kind": "base", "task": None,
                                         "parameters": sum(p.numel() for p in base.parameters()),
                                         "train_seconds": round(time.perf_counter() - t0, 1)}}
    benchmarks = benchmarks or {}
    jobs = [(root, preset, seed, name, False, benchmarks) for name in preset.tasks]
    jobs += [(root, preset, seed, name, True, benchmarks) for name in preset.lora_tasks]
    steps = [preset.lora_steps if lora else preset.steps_for(name) for _, _, _, name, lora, _ in jobs]
    log(f"fine-tuning {', '.join(preset.tasks)} ({preset.finetune_steps} steps, "
        + ", ".join(f"{t} {n}" for t, n in preset.extra_steps) + f") and LoRA adapters for {', '.join(preset.lora_tasks)}"
        + f" ({preset.lora_steps} steps), each then evaluated" + (f", in {pool._max_workers} processes" if pool else ""))
    calls = [(_train_job, job) for job in jobs] + [(_evaluate_job, (root, preset, "models/base", benchmarks))]
    order = sorted(range(len(jobs)), key=lambda i: -steps[i]) + [len(jobs)]  # longest first, the base's evaluation last
    results = _submit(pool, _run_job, calls, order)
    names = [f"{name}-lora" if lora else name for _, _, _, name, lora, _ in jobs]
    for i in (i for i, job in enumerate(jobs) if not job[4]):  # full fine-tunes first
        entries[names[i]] = results[i]()
    if on_full_models:
        on_full_models(dict(entries))
    for i, name in enumerate(names):
        entries[name] = results[i]()
        log(f"  {'LoRA ' if jobs[i][4] else ''}{jobs[i][3]}: trained in {entries[name]['train_seconds']}s")
    entries["base"]["accuracy"] = results[-1]()
    return entries


def _run_job(fn, args: tuple):
    return fn(*args)


def _evaluate_job(root: Path, preset: Preset, path: str, benchmarks: dict[str, str]) -> dict[str, float]:
    with fixed_threads(preset.threads):
        settings = eval_settings(preset)
        model, tokenizer = load_model(root / path, settings.dtype, "cpu")
        return {t: round(evaluate(model, tokenizer, load_benchmark(root / b, t), settings, batch_size=256,
                                  device="cpu").accuracy, 4) for t, b in benchmarks.items()}


def log_accuracy(accuracy: dict[str, dict[str, float]], log: Callable[[str], None]) -> None:
    for name, acc in accuracy.items():
        log(f"  {name}: " + " ".join(f"{t} {a:.3f}" for t, a in acc.items()))


def merge_check(root: Path, manifest: dict, log: Callable[[str], None], pool=None) -> dict | None:
    """Task arithmetic over the full fine-tunes, evaluated; None when `merging` is not importable yet.

    Also merges, for each composed benchmark (`tasks.compose`), just its two parents, and
    records that merge's accuracy on it under `transfer`: no threshold, it is measured.
    """
    from merging import merge

    preset = get_preset(manifest["preset"])
    benchmarks = {t: b["path"] for t, b in manifest["benchmarks"].items()}
    full = [n for n, m in manifest["models"].items() if m["kind"] == "full"]
    groups = [full] + [b["composed_of"] for b in manifest["benchmarks"].values() if "composed_of" in b]
    composed = {tuple(b["composed_of"]): t for t, b in manifest["benchmarks"].items() if "composed_of" in b}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        jobs = []
        for i, names in enumerate(groups):
            out = Path(tmp) / "-".join(names)
            merge({"base": str(root / "models" / "base"), **copy.deepcopy(MERGE_CHECK),
                   "models": [{"name": n, "path": str(root / manifest["models"][n]["path"])} for n in names]},
                  out, progress=False)
            key = composed.get(tuple(names)) if i else None  # a parents' merge is measured on its composed task only
            jobs.append((root, preset, str(out.relative_to(root)), {key: benchmarks[key]} if key else benchmarks))
        acc, *pairs = _map(pool, _evaluate_job, jobs)
    log("  task_arithmetic merge: " + " ".join(f"{t} {a:.3f}" for t, a in acc.items()))
    transfer = {}
    for names, pair in zip(groups[1:], pairs):
        key = composed[tuple(names)]
        transfer[key] = {"models": names, "accuracy": pair[key], "parents": {n: manifest["accuracy"][n][key] for n in names}}
        log(f"  transfer: task_arithmetic of {' + '.join(names)} scores {pair[key]:.3f} on {key}")
    return {**MERGE_CHECK, "models": full, "accuracy": acc, "transfer": transfer}


def quality_checks(manifest: dict) -> dict:
    """The zoo's quality thresholds, evaluated on the manifest's accuracies."""
    acc, models = manifest["accuracy"], manifest["models"]
    tuned = {n: m["task"] for n, m in models.items() if m["kind"] in ("full", "lora")}
    checks = {
        "finetunes_own_task": {n: {"acc": acc[n][t], "ok": acc[n][t] >= FT_MIN} for n, t in tuned.items()},
        "base_below": {t: {"acc": a, "ok": a < BASE_MAX} for t, a in acc["base"].items()},
        "composed_parents_below": {f"{n} on {t}": {"acc": acc[n][t], "ok": acc[n][t] < BASE_MAX}
                                   for t, b in manifest["benchmarks"].items() for n in b.get("composed_of", ())},
    }
    merge = manifest.get("merge_check")
    if merge:
        full = merge["models"]
        base_avg = float(np.mean([acc["base"][models[n]["task"]] for n in full]))
        ft_avg = float(np.mean([acc[n][models[n]["task"]] for n in full]))
        merge_avg = float(np.mean([merge["accuracy"][models[n]["task"]] for n in full]))
        checks["merge_between"] = {"base_avg": round(base_avg, 4), "merge_avg": round(merge_avg, 4), "finetune_avg": round(ft_avg, 4),
                                   "ok": base_avg + MERGE_MARGIN < merge_avg < ft_avg - MERGE_MARGIN}
    else:
        checks["merge_between"] = {"ok": None, "skipped": "merging not importable at build time"}
    flat = [c["ok"] for group in ("finetunes_own_task", "base_below", "composed_parents_below") for c in checks[group].values()]
    flat.append(checks["merge_between"]["ok"] is not False)
    checks["passed"] = all(flat)
    return checks


def _failures(checks: dict) -> list[str]:
    bad = [f"{n} scores {c['acc']:.3f} < {FT_MIN} on its task" for n, c in checks["finetunes_own_task"].items() if not c["ok"]]
    bad += [f"base scores {c['acc']:.3f} >= {BASE_MAX} on {t}" for t, c in checks["base_below"].items() if not c["ok"]]
    bad += [f"{k} scores {c['acc']:.3f} >= {BASE_MAX}: a parent alone solves the composed task"
            for k, c in checks.get("composed_parents_below", {}).items() if not c["ok"]]
    m = checks["merge_between"]
    if m["ok"] is False:
        bad.append(f"task-arithmetic merge averages {m['merge_avg']:.3f}, not clearly between base {m['base_avg']:.3f} "
                   f"and fine-tunes {m['finetune_avg']:.3f}")
    return bad


def verify(root: Path, manifest: dict) -> list[str]:
    """Files whose hash differs from the manifest (or that are missing)."""
    bad = []
    for name, m in manifest["models"].items():
        if folder_hashes(root / m["path"]) != m["files"]:
            bad.append(m["path"])
    for name, b in manifest["benchmarks"].items():
        p = root / b["path"]
        if not p.exists() or file_hash(p) != b["file_hash"]:
            bad.append(b["path"])
    return bad


def _write_manifest(root: Path, manifest: dict) -> None:
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _reusable(root: Path, preset: Preset, seed: int, log) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    # fields added to Preset since the build count as their defaults
    config = json.loads(json.dumps(preset.to_json()))  # tuples as lists, as the manifest holds them
    stored = {**Preset.defaults(), **manifest.get("preset_config", {})}
    if (manifest.get("format"), stored, manifest.get("seed")) != (FORMAT, config, seed):
        log(f"{root / MANIFEST} is for another preset, seed or format: rebuilding")
        return None
    bad = verify(root, manifest)
    if bad:
        log(f"files changed since the build ({', '.join(bad[:3])}{'...' if len(bad) > 3 else ''}): rebuilding")
        return None
    return manifest


def build_zoo(out: Path, preset: str = "tiny", seed: int = 0, log: Callable[[str], None] = print,
              strict: bool = True, workers: int | None = None, hooks: Hooks = NO_HOOKS) -> dict:
    """Builds (or reuses) the zoo in `out` and returns its manifest; see the module docstring.

    `workers` processes (default: one per CPU core, at most 4) train the fine-tunes and
    evaluate the models side by side; the weights do not depend on it. Each line of the build's
    log also goes to `hooks` as `{"type": "log", "message"}`, and a stop they ask for is honoured
    at the next line (`core.hooks.Stopped`; a zoo already in `out` stays as it was).
    """
    from transformers.utils import logging as hf_logging

    def report(line: str, _log=log) -> None:
        _log(line)
        hooks.emit({"type": "log", "message": line})
        hooks.check()

    log = report

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the build log
    out = Path(out)
    p = get_preset(preset)
    t_start = time.perf_counter()
    with _locked(out), fixed_threads(p.threads):
        manifest = _reusable(out, p, seed, log)
        if manifest is not None:
            log(f"reusing the {preset} zoo in {out} (hashes verified)")
        else:
            workers = workers if workers is not None else min(4, os.cpu_count() or 1)
            with _pool(workers) as pool:
                manifest = _build(out, p, seed, log, pool)
        if manifest.get("merge_check") is None:  # merging may have become importable since the build
            manifest["merge_check"] = merge_check(out, manifest, log)
            manifest["checks"] = quality_checks(manifest)
            _write_manifest(out, manifest)
    log(f"zoo ready in {time.perf_counter() - t_start:.1f}s: {out}")
    if strict and not manifest["checks"]["passed"]:
        raise ZooQualityError("zoo quality checks failed: " + "; ".join(_failures(manifest["checks"])))
    return manifest


def _build(out: Path, p: Preset, seed: int, log: Callable[[str], None], pool=None) -> dict:
    t0 = time.perf_counter()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(out) as work:
        manifest = {"format": FORMAT, "preset": p.name, "seed": seed, "preset_config": p.to_json(),
                    "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
                    "eval_settings": eval_settings(p).__dict__ | {"stop": list(eval_settings(p).stop)}}
        log(f"building the {p.name} zoo (seed {seed}) in {out}")
        benchmarks = {}
        for task in [TASKS[t] for t in p.tasks] + p.composed_tasks():
            path = write_task_benchmark(work / "benchmarks", task, p, seed)
            bench = load_benchmark(path, task.key)
            benchmarks[task.key] = {"path": f"benchmarks/{task.key}.jsonl", "items": len(bench), "gen_items": p.n_gen,
                                    "mc_items": p.n_mc, "match": task.match, "description": task.description,
                                    "hash": bench.hash, "file_hash": file_hash(path)}
            if ":" in task.name:
                benchmarks[task.key]["composed_of"] = task.name.split(":")
        manifest["benchmarks"] = benchmarks
        checked: dict[str, Any] = {}

        def check_merges(done: dict[str, dict]) -> None:  # while the adapters still train
            partial = {**manifest, "models": done, "accuracy": {n: m["accuracy"] for n, m in done.items() if "accuracy" in m}}
            checked["merge_check"] = merge_check(work, partial, log, pool)

        models = build_models(work, p, seed, log, pool, {t: b["path"] for t, b in benchmarks.items()}, check_merges)
        manifest["accuracy"] = {name: m.pop("accuracy") for name, m in models.items()}
        for m in models.values():
            m["weights_hash"] = weights_hash(work / m["path"])
            m["files"] = folder_hashes(work / m["path"])
        manifest["models"] = models
        manifest["models_seconds"] = round(time.perf_counter() - t0, 1)  # training and evaluating them
        log_accuracy(manifest["accuracy"], log)
        manifest["merge_check"] = checked["merge_check"]
        manifest["checks"] = quality_checks(manifest)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        _write_manifest(work, manifest)
    return manifest
