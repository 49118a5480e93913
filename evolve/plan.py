"""The memory plan of an evolve job: what it holds, where, and whether that fits, before anything loads.

An evolve job keeps one model resident and writes every candidate into it from a per-job
store of task vectors (`evolve.materialize`, `merging.store`). Whether that fits a machine
follows from shapes alone, so the plan reads only each model's `config.json`, the
safetensors headers (`merging.checkpoint.CheckpointReader`, no weights), the adapters'
targets, and the objectives' benchmarks (with the base's tokenizer, when it has one).
`evomerge plan SPEC.yaml`, the start of every evolve job (`check_plan`) and the service's
spec check (when it is given budgets) all use it, so a job that cannot fit is refused with
the component and the budget named instead of failing with an out-of-memory error hours in.

Components (bytes; "device" is the GPU for cuda, the host for cpu):

- resident model (device): the base's floating tensors in the evaluation dtype.
- task-vector store (device, else host): sum over models i, over the tensors model i
  changes (a full fine-tune: every floating tensor; a LoRA adapter: its targets), of
  `merging.store.tensor_bytes` for the store kind. `store: auto` takes the first of dense,
  lowrank, sparse that fits; on cuda the store sits on the GPU when model + store + merge
  working set + evaluation fit there, else on the host (then it crosses PCIe per candidate).
- base (disk): not resident; read tensor by tensor at each fresh materialization, every
  `reanchor_every` candidates (default 1 on cpu, 16 on cuda).
- method state (host): a method with a per-tensor context (TIES) keeps, for each task vector of
  more than `merging.selection.SMALL` entries, the histogram of its magnitudes' high bits (128 KB:
  `merging.selection.CachedChunks`; each candidate's trims skip that pass); 0 for the others
  (TSV's prepared updates replace the task vectors in the store, same size).
- merge working set (device, transient): what writing a candidate holds for the largest
  tensor (`evolve.materialize.working_set`: its read buffer and N + 6 float32 chunks, 2N + 6 for a
  method that is not linear in the task vectors: TIES' trimmed, DARE's dropped copies);
  and the store build's working set, held before the model is allocated (so the device's
  peak is the larger of the job and the store plus the build).
- evaluation (device) at batch B and sequence length L: KV cache
  2 x layers x B x L x kv_heads x head_dim x s; activations B x L x (4 hidden + 2 intermediate)
  x s; logits B x K x vocab x 4 (K: the longest choice in tokens, 1 for generation);
  attention scores B x heads x L x L x s (s: the evaluation dtype's size). L is the longest
  prompt + longest choice (multiple choice: padding makes a batch as wide as both) or
  prompt + max_new_tokens (generation) over the objectives' benchmarks.

Refusals name the spec field to change: `evaluation.dtype` (the model alone does not fit),
`device` (the model and the merge working set do not), `evaluation.batch_size` (evaluation
does not; the message gives the largest batch that fits), `evaluation.store` (no store
kind fits on the device nor on the host).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import FieldError

PLACES = ("gpu", "host", "disk")
STORE_ORDER = ("dense", "lowrank", "sparse")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BYTES_PER_TOKEN_ESTIMATE = 3  # without a tokenizer: 1 token per 3 bytes of UTF-8 (English averages about 4)
AUTO_BATCH_MAX = 256  # batch_size: auto takes the largest batch that fits, at most this
_DTYPE_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlanError(FieldError):
    """A job that does not fit (or cannot be planned); `field` is the spec field to change and
    the message starts with it."""


# bo's peak while it suggests (evolve/bo.py), measured: +112 MB at 100 observations and +172 MB
# at 300 (3 objectives, 6 genes, DTLZ2 data, one ask after the GP fits)
BO_BASE, BO_PER_OBSERVATION = 80 * 2**20, 360 * 2**10


@dataclass
class Component:
    name: str
    bytes: int
    where: str  # "gpu" | "host" | "disk"
    note: str = ""
    build_only: bool = False  # held only while the store is built, before the model exists


@dataclass
class Plan:
    """What an evolve job holds and where; `fits` is False when `error` says why not."""

    device: str  # "cuda" or "cpu": where the model lives and candidates are evaluated
    dtype: str  # evaluation dtype
    components: list[Component]
    budgets: dict[str, float | None]  # gpu / host bytes (None: not planned for, inf: unlimited)
    store_kind: str  # resolved (dense, lowrank, sparse)
    store_requested: str  # as the spec says (auto or a kind)
    store_where: str  # "gpu" or "host"
    store_options: dict[str, int]  # bytes of each kind considered
    batch_size: int
    seq_len: int
    seq_len_note: str
    max_batch: int  # the largest batch whose evaluation fits next to the model and working set
    reanchor_every: int
    moved: dict[str, int]  # bytes moved per candidate, by kind of transfer
    fits: bool = True
    error: PlanError | None = None
    title: str = ""

    @property
    def totals(self) -> dict[str, int]:
        """Peak bytes per place: the job's components, or while the store is built (before the
        model is allocated) the store and the build's working set, whichever is more."""
        job = {p: sum(c.bytes for c in self.components if c.where == p and not c.build_only) for p in PLACES}
        store = self.component("task-vector store")
        build = {p: sum(c.bytes for c in self.components if c.where == p and c.build_only)
                 + (store.bytes if store.where == p else 0) for p in PLACES}
        return {p: max(job[p], build[p]) for p in PLACES}

    @property
    def bytes_moved_per_candidate(self) -> int:
        return sum(self.moved.values())

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def table(self) -> str:
        rows = [("component", "where", "size", "note")]
        rows += [(c.name, c.where, human(c.bytes), c.note) for c in self.components]
        for place in ("gpu", "host", "disk"):
            budget = self.budgets.get(place)
            if place == "disk":
                rows.append(("total disk", "disk", human(self.totals[place]), "read, not held"))
            elif budget is not None:
                rows.append((f"total {place}", place, human(self.totals[place]), f"of {human(budget)} budget"))
        moved = ", ".join(f"{k} {human(v)}" for k, v in self.moved.items() if v)
        rows.append(("moved per candidate", "", human(self.bytes_moved_per_candidate), moved))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [self.title] if self.title else []
        for i, r in enumerate(rows):
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
            if i == 0 or i == len(self.components):
                lines.append("-" * min(sum(widths) + 6 + max(len(r[3]) for r in rows), 100))
        lines.append("fits: yes" if self.fits else f"fits: no: {self.error}")
        return "\n".join(lines)


def human(n: float | None) -> str:
    """Bytes in decimal units, one decimal (`parse_size` reads "24GB" as 24 x 10^9)."""
    if n is None:
        return "-"
    if n == math.inf:
        return "unlimited"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def count(n: int) -> str:
    """4_096_000 -> '4.1 M', for notes."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else str(n)


# --- inputs -------------------------------------------------------------------------------------

def host_available() -> int:
    """MemAvailable from /proc/meminfo (free pages where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _device(spec_device: str, gpu_memory: float | None) -> str:
    """cuda or cpu: an explicit device as given; auto is cuda when a GPU budget is given or a GPU is present."""
    if spec_device == "cpu":
        return "cpu"
    if spec_device.startswith("cuda"):
        return "cuda"
    return "cuda" if gpu_memory is not None or torch.cuda.is_available() else "cpu"


def _gpu_budget(spec_device: str, gpu_memory: float | None) -> float:
    if gpu_memory is not None:
        return gpu_memory
    if not torch.cuda.is_available():
        raise PlanError("device", f"{spec_device} asked for, but CUDA is not available here; "
                                  "plan for a GPU of a given size with --gpu-memory")
    dev = torch.device(spec_device if spec_device.startswith("cuda") else "cuda")
    return torch.cuda.mem_get_info(dev)[0]


def _config(base: Path) -> dict[str, int]:
    """The shape numbers evaluation memory depends on, from config.json (text_config for multimodal)."""
    path = base / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError("base", f"{base}: cannot read config.json ({e})") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg

    def get(*keys, default=None):
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        if default is None:
            raise PlanError("base", f"{path}: no {keys[0]} (needed to size evaluation memory)")
        return default

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    return {"hidden": hidden, "heads": heads,
            "layers": get("num_hidden_layers", "n_layer", "num_layers"),
            "intermediate": get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            "kv_heads": get("num_key_value_heads", default=heads),
            "head_dim": get("head_dim", default=hidden // heads),
            "vocab": get("vocab_size")}


def _token_lengths(spec, base: Path) -> tuple[int, int, str]:
    """(L, K, how): the longest evaluated sequence and the longest choice, in tokens."""
    from data.benchmarks import BenchmarkError, load_benchmark

    tokenizer, how = None, ""
    if any((base / f).is_file() for f in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(base))
            how = "tokens by the base's tokenizer"
        except Exception as e:  # an unusable tokenizer: plan on the estimate, and say so
            how = f"the base's tokenizer does not load ({type(e).__name__}); "
    if tokenizer is None:
        how += f"tokens estimated as 1 per {BYTES_PER_TOKEN_ESTIMATE} bytes of UTF-8 (+1 bos)"

    def lengths(texts: list[str], special: bool) -> list[int]:
        if not texts:
            return []
        if tokenizer is not None:
            return [len(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]
        return [-(-len(t.encode()) // BYTES_PER_TOKEN_ESTIMATE) + int(special) for t in texts]

    seq, choice, seen = 0, 0, set()
    for i, o in enumerate(spec.objectives):
        if Path(o.benchmark) in seen:
            continue
        seen.add(Path(o.benchmark))
        try:
            items = load_benchmark(o.benchmark).items
        except BenchmarkError as e:
            raise PlanError(f"objectives[{i}].benchmark", str(e)) from None
        mc = [it for it in items if it.is_choice]
        gen = [it for it in items if not it.is_choice]
        if mc:
            longest_choice = max(lengths([c for it in mc for c in it.choices], False))
            choice = max(choice, longest_choice)
            seq = max(seq, max(lengths([it.prompt for it in mc], True)) + longest_choice)
        if gen:
            seq = max(seq, max(lengths([it.prompt for it in gen], True)) + spec.evaluation.max_new_tokens)
    return seq, max(choice, 1), how


def evaluation_bytes(cfg: dict[str, int], batch: int, seq: int, choice: int, size: int) -> dict[str, int]:
    """Evaluation memory at `batch` sequences of `seq` tokens (see the module docstring)."""
    b, L = batch, seq
    return {
        "KV cache": 2 * cfg["layers"] * b * L * cfg["kv_heads"] * cfg["head_dim"] * size,
        "activations": b * L * (4 * cfg["hidden"] + 2 * cfg["intermediate"]) * size,
        "logits": b * choice * cfg["vocab"] * 4,
        "attention scores": b * cfg["heads"] * L * L * size,
    }


# --- the plan -----------------------------------------------------------------------------------

def plan_job(spec, gpu_memory: float | None = None, host_memory: float | None = None,
             device: str | None = None) -> Plan:
    """The memory plan of an evolve spec against a GPU of `gpu_memory` bytes and `host_memory`
    bytes of host memory (defaults: the free GPU memory, MemAvailable; `math.inf`: not checked).
    `device` overrides the spec's. Returns the plan, `fits` False and `error` set when the job
    does not fit; raises PlanError when it cannot be planned at all (no config, no GPU to ask)."""
    from merging.store import StoreSettings, tensor_bytes
    from merging.task_vectors import AdapterSource, open_inputs

    spec_device = device or spec.device
    dev = _device(spec_device, gpu_memory)
    gpu = _gpu_budget(spec_device, gpu_memory) if dev == "cuda" else None
    host = host_memory if host_memory is not None else host_available()
    on = "gpu" if dev == "cuda" else "host"
    where_name = "GPU memory" if dev == "cuda" else "host memory"
    device_budget = gpu if dev == "cuda" else host

    ev = spec.evaluation
    # core.devices.resolve_dtype's rule, for a device that need not be on this machine
    dtype = ev.dtype if ev.dtype != "auto" else ("bfloat16" if dev == "cuda" else "float32")
    size = _DTYPE_SIZE[dtype]
    store_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    reanchor = ev.reanchor_every or (16 if dev == "cuda" else 1)

    base = Path(spec.base)
    reader, sources = open_inputs(base, [m.path for m in spec.models], spec.tokenizer)
    infos = {n: reader.info(n) for n in reader.names()}
    floating = {n: i for n, i in infos.items() if i.dtype.is_floating_point}
    params = sum(i.numel for i in floating.values())
    n_models = len(sources)

    model = params * size
    largest = max(floating, key=lambda n: floating[n].numel)
    from merging.methods import get_method

    from .materialize import CHUNK, working_set

    read_size = floating[largest].dtype.itemsize
    method = get_method(spec.method)
    build, work = working_set(method, floating[largest].numel, n_models, read_size)
    from merging.selection import HISTOGRAM_BYTES, by_radix

    state = HISTOGRAM_BYTES * n_models * sum(by_radix(i.numel) for i in floating.values()) if method.context else 0
    base_bytes = sum(i.numel * i.dtype.itemsize for i in infos.values())

    changed = [[n for n in s.adapter.targets() if n in floating] if isinstance(s, AdapterSource) else list(floating)
               for s in sources]
    adapters = sum(isinstance(s, AdapterSource) for s in sources)

    def store_bytes(kind: str) -> int:
        s = StoreSettings(kind, store_dtype, rank=ev.store_rank, density=ev.store_density)
        return sum(tensor_bytes(floating[n].shape, n, s) for names in changed for n in names)

    cfg = _config(base)
    seq, choice, how = _token_lengths(spec, base)
    per_seq = sum(evaluation_bytes(cfg, 1, seq, choice, size).values())
    room = device_budget - model - work
    max_batch = (1 << 30) if room == math.inf else max(0, int(room // per_seq))
    auto_batch = ev.batch_size == "auto"
    batch = 1 if auto_batch else ev.batch_size  # auto: the store is placed first, then the batch fills the room

    # which store, and where: the first kind (of those allowed) that fits on the device, else on the host
    kinds = STORE_ORDER if ev.store == "auto" else (ev.store,)
    options = {k: store_bytes(k) for k in kinds}
    state_on = state if on == "host" else 0  # the method state is host memory
    fixed = state_on + (model + work + batch * per_seq if auto_batch else model + work + sum(
        evaluation_bytes(cfg, batch, seq, choice, size).values()))  # on the device whatever the store
    for kind in kinds:
        if max(fixed, build) + options[kind] <= device_budget:
            store_where, store_fits = on, True
            break
        if dev == "cuda" and options[kind] + state <= host:
            store_where, store_fits = "host", True
            break
    else:
        store_where, store_fits = "host", False
    store = options[kind]
    if auto_batch:
        left = room - (store if store_where == on else 0)
        batch = AUTO_BATCH_MAX if left == math.inf else min(max(int(left // per_seq), 1), AUTO_BATCH_MAX)
    evaluation = evaluation_bytes(cfg, batch, seq, choice, size)
    eval_total = sum(evaluation.values())
    fixed = state_on + model + work + eval_total

    error: PlanError | None = None
    if model > device_budget:
        error = PlanError("evaluation.dtype", f"the resident model ({count(params)} parameters x {size} B, {dtype}: "
                                              f"{human(model)}) does not fit in {where_name} ({human(device_budget)})")
    elif model + work > device_budget:
        error = PlanError("device", f"the resident model ({human(model)}) and the merge working set ({human(work)}, "
                                    f"for {largest}: {count(floating[largest].numel)} entries) do not "
                                    f"fit in {where_name} ({human(device_budget)})")
    elif build > device_budget:
        error = PlanError("device", f"building the task-vector store needs {human(build)} for {largest} "
                                    f"({count(floating[largest].numel)} entries), more than {where_name} "
                                    f"({human(device_budget)})")
    elif fixed > device_budget:
        error = PlanError("evaluation.batch_size", (
            f"evaluation at batch {batch} x {seq} tokens ({human(eval_total)}: "
            + ", ".join(f"{k} {human(v)}" for k, v in evaluation.items())
            + f") does not fit in {where_name} ({human(device_budget)}) next to the resident model ({human(model)}) "
            f"and the merge working set ({human(work)}); "
            + (f"the largest batch that fits is {max_batch}" if max_batch else
               f"not even one sequence fits ({human(per_seq)}): shorten the prompts or max_new_tokens")))
    elif not store_fits:
        if dev == "cuda":
            place = (f"GPU memory ({human(gpu)}) next to the resident model, merge working set and evaluation "
                     f"({human(fixed)}), nor in host memory ({human(host)})")
        else:
            place = (f"host memory ({human(host)}) next to the resident model, merge working set and "
                     f"evaluation ({human(fixed)})")
        if len(kinds) == 1:
            which = f"the task-vector store ({n_models} x {kind}, {human(store)})"
            hint = ("try store: lowrank or sparse (auto picks the first that fits)" if kind == "dense"
                    else f"lower store_{'rank' if kind == 'lowrank' else 'density'} or try store: auto")
        else:
            which = f"no task-vector store ({n_models} models: {', '.join(f'{k} {human(v)}' for k, v in options.items())})"
            hint = "lower store_rank / store_density"
        error = PlanError("evaluation.store", f"{which} does not fit in {place}; {hint}")

    knob = {"dense": "", "lowrank": f", rank {ev.store_rank}", "sparse": f", density {ev.store_density}"}[kind]
    store_note = f"{n_models} x {kind}{knob}, {str(store_dtype).removeprefix('torch.')}"
    if adapters:
        store_note += f" ({adapters} LoRA adapter{'s' if adapters > 1 else ''}: their targets only)"
    if ev.store == "auto":
        skipped = [f"{k} ({human(options[k])})" for k in STORE_ORDER[:STORE_ORDER.index(kind)]]
        store_note += "; auto" + (f": {' and '.join(skipped)} {'does' if len(skipped) == 1 else 'do'} not fit"
                                  if skipped else "")
    if store_where == "host" and dev == "cuda":
        store_note += "; crosses PCIe per candidate"

    components = [
        Component("resident model", model, on, f"{count(params)} parameters x {size} B ({dtype})"),
        Component("task-vector store", store, store_where, store_note),
        Component("base", base_bytes, "disk", f"read at each fresh materialization (every {reanchor} candidate"
                                              f"{'s' if reanchor > 1 else ''})"),
        Component("method state", state, "host", f"{spec.method}: magnitude histograms of the stored vectors, kept "
                                                 "for each candidate's trims" if state else
                  f"{spec.method}: per-tensor, nothing kept between candidates"),
        Component("merge working set", work, on, f"per candidate, for {largest} ({count(floating[largest].numel)} "
                                                 f"entries, chunks of {count(CHUNK)}), transient"),
        Component("store build", build, on, f"while the store is built, before the model is allocated "
                                            f"({largest}), transient", build_only=True),
    ]
    components += [Component(f"evaluation: {k}", v, on, f"batch {batch} x {seq} tokens"
                             + (f", K = {choice}" if k == "logits" else "")) for k, v in evaluation.items()]
    search = getattr(spec, "search", None)
    if search is not None and search.algorithm == "bo":
        n_obs = search.population * search.generations + spec.evaluation.irt.probes + spec.evaluation.irt.more_probes
        components.append(Component("search: bo surrogate", BO_BASE + BO_PER_OBSERVATION * n_obs, "host",
                                    f"GP fits and acquisition at up to {n_obs} observations, transient"))

    moved = {"store read": store, "host->GPU": store if (dev == "cuda" and store_where == "host") else 0,
             "model written": model, "disk read": base_bytes // reanchor}
    title = (f"plan: {spec.base} + {n_models} model{'s' if n_models > 1 else ''} ({spec.method}), device {dev} "
             f"({dtype}), store {ev.store} -> {kind} on {store_where}\n"
             f"evaluation: batch {batch}{' (auto)' if ev.batch_size == 'auto' else ''} x L = {seq} tokens ({how})")
    plan = Plan(dev, dtype, components, {"gpu": gpu, "host": host}, kind, ev.store, store_where, options,
                batch, seq, how, max_batch, reanchor, moved, title=title)
    plan.fits, plan.error = error is None, error
    return plan


def check_plan(spec, gpu_memory: float | None = None, host_memory: float | None = None) -> Plan:
    """The plan of `spec` on this machine (free GPU memory, MemAvailable), or PlanError when it
    does not fit: what an evolve job runs before it loads anything."""
    plan = plan_job(spec, gpu_memory, host_memory)
    if not plan.fits:
        raise plan.error
    return plan
