"""ATM: Alternating Tuning and Merging (Zhou, Solombrino, Crisostomi, Bucarelli, Silvestri,
Rodola, "ATM: Improving Model Merging by Alternating Tuning and Merging", arXiv:2411.03055).

The paper's observation (Sec. 3): after one epoch of gradient descent a task vector is
the negative, learning-rate-scaled gradient of that task's loss, so the sum (mean) of
task vectors is one step of multi-task gradient descent; a one-shot merge of models
fine-tuned to the end is one very long step. ATM (Sec. 4, Algorithm 1) takes many
short steps instead:

    theta_0 = theta_base
    for t = 1..T:
        for each task i:  theta_i^t = finetune(theta_{t-1}, D_i, budget_t)      (fresh optimizer)
                          tau_i^t   = theta_i^t - theta_{t-1}
        theta_t = theta_{t-1} + alpha * combine(tau_1^t, ..., tau_n^t)

`combine` is task arithmetic (the sum, as in the paper) or any registered merge method
(`merging.methods`: TIES, DARE, TSV, ...), applied tensor by tensor exactly as a one-shot
merge applies it, with the previous iterate as its "base". Where the method has its own
scale (`lambda` for task arithmetic, TIES and DARE; `alpha` for TSV), `alpha` multiplies
it, which is the same update; otherwise theta_t = theta_{t-1} + alpha * (merged - theta_{t-1}).

Defaults, and where they come from. From the authors' code
(github.com/LuckerZOfficiaL/Alternating-Tuning-and-Merging): the merge is the *mean* of
the task vectors with scaling 1 (`SumAggregator(mean=True)`, `scaling_coefficient: 1`),
so `alpha` defaults to 1/n with task arithmetic's sum (1 with methods that already
average, such as TIES, which the authors also apply with scaling 1); each iteration fine-tunes for one
epoch (`autoexperiment.py`: `epochs = 1` per "order") over 10 iterations
(`desired_orders = 10`); the optimizer is Adam at a constant learning rate 1e-5 (no
scheduler, no weight decay), batch 32, gradient clipping at norm 10. We use AdamW with
weight decay 0 (the same update as Adam). From the paper: with a fixed compute budget the
budget is split evenly over the iterations so that the total equals one standard
fine-tuning run (`total_steps` here: iteration t gets its share, the shares summing to
exactly `total_steps`); more, smaller iterations do better at equal budget.

The paper's second use (Sec. 5.3, `ft_on_data_split: val` in the code) refines an
existing one-shot merge with a few ATM iterations on a small *validation* set: give
every model its fine-tuned `path` and, as `train`, a validation JSONL, and set
`init: merge`; theta_0 is then `combine` of the fine-tunes and ATM tunes from there.

Data: each model's `train` is a JSONL file in the benchmark format
(`data.benchmarks`); a generation item trains on (prompt, answer), a multiple-choice
item on (prompt, its correct choice). Loss is on the answer tokens only; training is
`merging.training.train` (the zoo's seeded loop), full fine-tuning or LoRA (`lora`),
with gradient accumulation and bf16 autocast on CUDA. The training seed of task i in
iteration t is `seed + 1000 * (t - 1) + i`.

State and resume: each finished iteration's theta_t is a float32 HF folder
`theta-<t>` in the state folder beside the output (`.<out>.atm-state`), followed by
an atomically replaced `state.json`; each finished task's fine-tune of the current
iteration is kept there too (written atomically). A run that dies resumes after its last
finished iteration (and finished tasks), with bit-identical results on CPU; a state left
by a different spec (inputs' hashes, parameters, device) is discarded. A finished run
leaves only the normal HF folder at the output.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.hooks import NO_HOOKS, Hooks

from .methods.registry import Method, add, get_method, method_params

STATE_VERSION = 1
STATE_FILE = "state.json"
MAX_STEPS = 10_000_000  # per task: a bound on a typo, far above any budget ATM is run with


class LoraParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


class AtmParams(BaseModel):
    """`params` of `method: atm` (see the module docstring for where each default comes from)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    iterations: int = Field(10, ge=1, le=10_000, description="T, the number of tune-then-merge rounds")
    steps_per_iteration: int | list[int] | None = Field(
        None, description="optimizer steps per task per iteration (one value or one per model)")
    epochs_per_iteration: float | None = Field(
        None, gt=0, le=10_000, description="passes over each task's data per iteration (default 1 if no budget is given)")
    total_steps: int | list[int] | None = Field(
        None, description="steps per task over all iterations, split evenly (the paper's equal-budget rule)")
    lr: float = Field(1e-5, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="share of each iteration's steps spent warming up")
    weight_decay: float = Field(0.0, ge=0.0)
    clip: float = Field(10.0, ge=0.0, description="gradient norm clip (0: none)")
    batch_size: int = Field(32, ge=1, le=65_536)
    grad_accum: int = Field(1, ge=1, le=65_536, description="micro-batches per optimizer step")
    alpha: float | None = Field(None, description="scale of the merged update; default 1/n (the mean)")
    combine: str = Field("task_arithmetic", description="registered merge method combining each round's task vectors")
    combine_params: dict[str, Any] = Field(default_factory=dict)
    init: Literal["base", "merge"] = Field("base", description="theta_0: the base, or combine of the models' paths")
    lora: LoraParams | None = None
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    train_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights while training; auto: bfloat16 for LoRA under bf16 autocast, else float32")
    gradient_checkpointing: bool = False
    seed: int = 0

    @field_validator("steps_per_iteration", "total_steps")
    @classmethod
    def _positive(cls, v):
        for x in v if isinstance(v, list) else ([] if v is None else [v]):
            if not 1 <= x <= MAX_STEPS:
                raise ValueError(f"must be between 1 and {MAX_STEPS:,}, got {x}")
        return v

    @field_validator("combine")
    @classmethod
    def _combine(cls, v: str) -> str:
        kind = get_method(v).kind
        if kind == "training":
            raise ValueError(f"{v} trains, it cannot combine atm's rounds; name a merge method such as task_arithmetic")
        if kind == "model":
            raise ValueError(f"{v} aligns whole models; atm combines per tensor (task_arithmetic, ties, ...)")
        return v

    @model_validator(mode="after")
    def _budget(self):
        given = [k for k in ("steps_per_iteration", "epochs_per_iteration", "total_steps") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of steps_per_iteration, epochs_per_iteration, total_steps (got {', '.join(given)})")
        try:  # keys and types now; per-model lengths in check(), once the models are known
            get_method(self.combine).params.model_validate(self.combine_params, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"combine_params.{field}: {err['msg']} (method {self.combine})") from None
        return self

    def check(self, n_models: int) -> None:
        """Per-model lists against the number of models; raises ValueError naming the field."""
        for field in ("steps_per_iteration", "total_steps"):
            v = getattr(self, field)
            if isinstance(v, list) and len(v) != n_models:
                raise ValueError(f"params.{field}: {len(v)} values for {n_models} models")
        if self.total_steps is not None:
            for s in self.total_steps if isinstance(self.total_steps, list) else [self.total_steps]:
                if s < self.iterations:
                    raise ValueError(f"params.total_steps: {s} steps cannot be split over {self.iterations} iterations")
        self.combine_method_params(n_models)

    def combine_method_params(self, n_models: int):
        try:
            return method_params(self.combine, self.combine_params, n_models)
        except ValueError as e:
            raise ValueError(str(e).replace("params.", "params.combine_params.", 1)) from None

    def alpha_for(self, n_models: int) -> float:
        """`alpha`, or by default the authors' mean: 1/n for a combine that sums the task
        vectors (task arithmetic, DARE-linear, TSV-M), 1 for one that averages them already
        (linear, TIES' disjoint mean; the authors' TIES is applied with scaling 1 too)."""
        if self.alpha is not None:
            return self.alpha
        return 1.0 / n_models if get_method(self.combine).sums else 1.0

    def steps(self, iteration: int, model: int, n_pairs: int) -> int:
        """Optimizer steps for `model` in `iteration` (1-based)."""
        def pick(v):
            return v[model] if isinstance(v, list) else v

        if self.steps_per_iteration is not None:
            return pick(self.steps_per_iteration)
        if self.total_steps is not None:
            total, T = pick(self.total_steps), self.iterations
            return total * iteration // T - total * (iteration - 1) // T
        epochs = self.epochs_per_iteration if self.epochs_per_iteration is not None else 1.0
        return max(1, math.ceil(epochs * n_pairs / (self.batch_size * self.grad_accum)))


def check_models(params: AtmParams, models: Sequence[Any]) -> None:
    """What ATM needs of `models`: training data for each, and fine-tuned paths for `init: merge`."""
    for i, m in enumerate(models):
        if getattr(m, "train", None) is None:
            raise ValueError(f"models[{i}].train: method atm needs a training JSONL file for every model")
        if params.init == "merge" and m.path is None:
            raise ValueError(f"models[{i}].path: params.init 'merge' starts from a merge of the models' fine-tunes")


# --- data ------------------------------------------------------------------------------

def load_pairs(path: str | os.PathLike, field: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a benchmark-format JSONL: generation items as they are,
    multiple-choice items with their correct choice as the answer."""
    from data.benchmarks import BenchmarkError, load_benchmark

    try:
        bench = load_benchmark(path)
    except BenchmarkError as e:
        raise ValueError(f"{field}: {e}") from None
    if not bench.items:
        raise ValueError(f"{field}: {path} holds no items")
    return [(it.prompt, it.choices[it.answer] if it.is_choice else str(it.answer)) for it in bench.items]


# --- the run ---------------------------------------------------------------------------

def state_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.atm-state"


def _write_json(path: Path, data: dict) -> None:
    from core.fs import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _train_dtype(p: AtmParams, device: torch.device) -> torch.dtype:
    from .training import autocast_dtype

    if p.train_dtype == "float32":
        return torch.float32
    if p.train_dtype == "bfloat16":
        return torch.bfloat16
    amp = autocast_dtype(p.mixed_precision, device)
    return torch.bfloat16 if (p.lora is not None and amp is torch.bfloat16) else torch.float32


class _Progress:
    """Step events for the hooks (at most every 0.5 s, and at each task's end) and a tqdm bar."""

    def __init__(self, hooks: Hooks, total_steps: int, done_steps: int, show: bool, iterations: int):
        from tqdm import tqdm

        self.hooks, self.total, self.done = hooks, total_steps, done_steps
        self.iterations, self.last = iterations, 0.0
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="atm", unit="step", disable=not show, leave=False)

    def emit(self, data: dict) -> None:
        self.hooks.emit(data)

    def step(self, iteration: int, task: str, step: int, steps: int, loss: float) -> None:
        self.done += 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"it {iteration} {task} loss {loss:.4f}")
        now = time.monotonic()
        if now - self.last > 0.5 or step == steps:
            self.last = now
            self.emit({"type": "progress", "stage": "atm", "iteration": iteration, "iterations": self.iterations,
                       "task": task, "step": step, "steps": steps, "loss": round(loss, 6),
                       "fraction": round(self.done / max(self.total, 1), 4)})
        self.hooks.check()


def run_atm(spec, out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = True,
            card_extra: dict | None = None, hooks: Hooks = NO_HOOKS) -> Path:
    """Runs ATM as `spec` (a MergeSpec with `method: atm`) says and writes the result to `out_dir`.

    `hooks.progress` receives progress events (`{"type": "progress", "iteration", "task",
    "step", "steps", "loss", ...}` and `{"type": "iteration", "iteration", "loss": {task: mean}}`);
    when `hooks.should_stop()` turns true the run raises `core.hooks.Stopped` and a later call
    resumes. One
    process at a time per `out_dir` (`core.locks`): a second is refused, its state untouched.
    """
    from core.locks import exclusive

    with exclusive(out_dir, "an ATM merge"):
        return _run_atm(spec, Path(out_dir), overwrite, progress, hooks, card_extra)


def _run_atm(spec, out: Path, overwrite: bool, progress: bool, hooks: Hooks, card_extra) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.devices import DTYPES, resolve_device
    from core.hashing import content_hash, file_sha256

    from .card import model_card
    from .checkpoint import CheckpointReader, CheckpointWriter, TensorInfo
    from .task_vectors import open_source
    from .training import LoraSpec, train

    # merge() has refused an existing folder unless overwrite
    p: AtmParams = spec.method_params()
    n = len(spec.models)
    check_models(p, spec.models)
    device = resolve_device(spec.device)
    base_reader = CheckpointReader(spec.base)
    base_infos = {k: base_reader.info(k) for k in base_reader.names()}
    fine_tunes = [m.path for m in spec.models if m.path is not None]
    if fine_tunes:  # the same checks a one-shot merge makes
        from .task_vectors import open_inputs

        open_inputs(spec.base, fine_tunes)
    data = [load_pairs(m.train, f"models[{i}].train") for i, m in enumerate(spec.models)]
    combine = get_method(p.combine)
    cparams = p.combine_method_params(n)
    alpha = p.alpha_for(n)
    scale_field = next((f for f in ("lambda_", "alpha") if f in type(cparams).model_fields), None)
    if scale_field is not None:  # fold alpha into the method's own scale: the same update, in one step
        cparams = cparams.model_copy(update={scale_field: getattr(cparams, scale_field) * alpha})
    train_dtype = _train_dtype(p, device)
    steps = [[p.steps(t, i, len(data[i])) for i in range(n)] for t in range(1, p.iterations + 1)]

    hashes = {str(spec.base): content_hash(spec.base)}
    hashes.update({str(m.path): content_hash(m.path) for m in spec.models if m.path is not None})
    train_hashes = {m.name: file_sha256(Path(m.train)) for m in spec.models}
    fingerprint = hashlib.sha256(json.dumps({
        "v": STATE_VERSION, "base": hashes[str(spec.base)], "device": device.type,
        "models": [[m.name, hashes.get(str(m.path)), train_hashes[m.name]] for m in spec.models],
        "params": p.model_dump(mode="json"), "train_dtype": str(train_dtype),
    }, sort_keys=True).encode()).hexdigest()

    state_dir = state_dir_for(out)
    state = _load_state(state_dir, fingerprint)
    if state is None:
        shutil.rmtree(state_dir, ignore_errors=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"version": STATE_VERSION, "fingerprint": fingerprint, "iteration": 0, "theta": None,
                 "history": [], "train_seconds": 0.0, "merge_seconds": 0.0}
    _clean(state_dir, state)
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    done_steps = sum(sum(s) for s in steps[: state["iteration"]])
    bar = _Progress(hooks, sum(sum(s) for s in steps), done_steps, progress, p.iterations)

    def theta_path() -> Path:
        return Path(spec.base) if state["theta"] is None else state_dir / state["theta"]

    def write_merge(dest: Path, prev: Path, sources, method_params, interpolate: float | None) -> None:
        """theta_new = combine over the sources' deltas against `prev` (then, when `interpolate`
        is given, prev + interpolate * (merged - prev)), in float32, tensor by tensor."""
        reader = CheckpointReader(prev)
        infos = {k: TensorInfo(i.shape, torch.float32 if i.dtype.is_floating_point else i.dtype)
                 for k, i in base_infos.items()}
        with CheckpointWriter(dest, infos, torch.float32, spec.output.max_shard_size, overwrite=True) as w:
            for name in w.expected:
                if not base_infos[name].dtype.is_floating_point:
                    w.write(name, reader.get(name))
                    continue
                theta = reader.get(name, device, torch.float32)
                deltas = [s.delta(name, theta) for s in sources]
                merged = combine.fn(theta, deltas, method_params, name)
                if interpolate is not None and interpolate != 1.0:
                    merged = theta + interpolate * (merged - theta)
                w.write(name, merged)
            w.finish(side_files_from=spec.base)

    if state["iteration"] == 0 and p.init == "merge" and state["theta"] is None:
        t0 = time.perf_counter()
        bar.emit({"type": "stage", "stage": "atm-init", "method": p.combine})
        # the one-shot merge of the fine-tunes, as `combine` and its params say (no ATM alpha)
        write_merge(state_dir / "theta-0", Path(spec.base), [open_source(m.path) for m in spec.models],
                    p.combine_method_params(n), None)
        state.update(theta="theta-0", merge_seconds=state["merge_seconds"] + time.perf_counter() - t0)
        _write_json(state_dir / STATE_FILE, state)

    for t in range(state["iteration"] + 1, p.iterations + 1):
        prev = theta_path()
        work = state_dir / f"work-{t}"
        work.mkdir(exist_ok=True)
        losses: dict[str, float] = {}
        prior = state.get("partial", {}) if state.get("partial_iteration") == t else {}
        for i, m in enumerate(spec.models):
            task_dir = work / m.name
            n_steps = steps[t - 1][i]
            if task_dir.is_dir() and m.name in prior:  # finished before a restart
                losses[m.name] = prior[m.name]
                bar.done += n_steps
                bar.bar.update(n_steps)
                continue
            hooks.check()
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(prev, dtype=train_dtype)
            seen: list[float] = []

            def on_step(step: int, loss: float, _name=m.name, _n=n_steps, _seen=seen, _t=t) -> None:
                _seen.append(loss)
                bar.step(_t, _name, step, _n, loss)

            lora = None if p.lora is None else LoraSpec(p.lora.r, p.lora.alpha, p.lora.dropout, tuple(p.lora.target_modules))
            trained = train(model, tokenizer, data[i], n_steps, batch_size=p.batch_size, lr=p.lr,
                            weight_decay=p.weight_decay, warmup=p.warmup, schedule=p.schedule, clip=p.clip,
                            seed=p.seed + 1000 * (t - 1) + i, lora=lora, grad_accum=p.grad_accum,
                            mixed_precision=p.mixed_precision, gradient_checkpointing=p.gradient_checkpointing,
                            device=device, on_step=on_step)
            _save_task_model(trained, task_dir, base_infos, lora is not None)
            del trained, model
            losses[m.name] = sum(seen) / max(len(seen), 1)
            state["train_seconds"] += time.perf_counter() - t0
            state.update(partial_iteration=t, partial={**prior, **losses})
            _write_json(state_dir / STATE_FILE, state)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        t0 = time.perf_counter()
        write_merge(state_dir / f"theta-{t}", prev, [open_source(work / m.name) for m in spec.models], cparams,
                    None if scale_field is not None else alpha)
        old = state["theta"]
        state.update(iteration=t, theta=f"theta-{t}", partial_iteration=None, partial={},
                     merge_seconds=state["merge_seconds"] + time.perf_counter() - t0)
        state["history"].append({"iteration": t, "loss": losses, "steps": dict(zip([m.name for m in spec.models], steps[t - 1]))})
        _write_json(state_dir / STATE_FILE, state)
        shutil.rmtree(work, ignore_errors=True)
        if old is not None:
            shutil.rmtree(state_dir / old, ignore_errors=True)
        bar.emit({"type": "iteration", "stage": "atm", "iteration": t, "iterations": p.iterations,
                  "loss": {k: round(v, 6) for k, v in losses.items()}, "fraction": round(bar.done / max(bar.total, 1), 4)})
    bar.bar.close()

    final = CheckpointReader(theta_path())
    summary = {"atm": {"iterations": p.iterations, "alpha": alpha, "combine": p.combine,
                       "steps_per_task": {m.name: sum(s[i] for s in steps) for i, m in enumerate(spec.models)},
                       "train_seconds": round(state["train_seconds"], 1), "merge_seconds": round(state["merge_seconds"], 1),
                       "train_sha256": train_hashes, "history": state["history"]}}
    dtype = DTYPES[spec.output.dtype] if spec.output.dtype else None
    with CheckpointWriter(out, base_infos, dtype, spec.output.max_shard_size, overwrite) as w:
        for name in w.expected:
            w.write(name, final.get(name))
        result = w.finish(side_files_from=spec.base, card=model_card(spec, hashes, {**summary, **(card_extra or {})}))
    _write_json(result / "atm.json", summary["atm"])
    shutil.rmtree(state_dir, ignore_errors=True)
    return result


def _load_state(state_dir: Path, fingerprint: str) -> dict | None:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        return None
    if state.get("theta") is not None and not (state_dir / state["theta"] / "config.json").is_file():
        return None
    return state


def _clean(state_dir: Path, state: dict) -> None:
    """Removes what a killed run left that the state does not refer to (temporary folders, old iterates)."""
    keep = {STATE_FILE, state.get("theta"), f"work-{state['iteration'] + 1}"}
    for child in state_dir.iterdir():
        if child.name not in keep:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    work = state_dir / f"work-{state['iteration'] + 1}"
    if work.is_dir():
        done = set(state.get("partial", {})) if state.get("partial_iteration") == state["iteration"] + 1 else set()
        for child in work.iterdir():
            if child.name not in done:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def _save_task_model(model, folder: Path, base_infos: dict, is_lora: bool) -> None:
    """A task's fine-tune as a folder `open_source` reads: a float32 checkpoint with the base's
    tensor names, or the LoRA adapter (the delta is then scale * B @ A, as peft merges it)."""

    from core.fs import atomic_folder

    from .checkpoint import write_checkpoint

    folder.parent.mkdir(parents=True, exist_ok=True)
    if is_lora:
        with atomic_folder(folder) as tmp:
            model.save_pretrained(tmp)
        return
    sd = model.state_dict()
    missing = [k for k in base_infos if k not in sd]
    if missing:
        raise ValueError(f"the trained model has no tensor {missing[0]} (of the base's checkpoint)")
    tensors = {k: (sd[k].detach().float() if sd[k].is_floating_point() else sd[k].detach()) for k in base_infos}
    write_checkpoint(folder, tensors, torch.float32)


add(Method("atm", AtmParams, kind="training", run=run_atm, check_models=check_models,
           doc="ATM: alternate short fine-tunes per task and merges (Zhou et al. 2024)."))
