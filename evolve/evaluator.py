"""One evaluator of an evolve job: what a process (this one, or a Ray actor) needs to answer the
job's tasks, loaded once and kept: the base's tokenizer, the objectives' benchmarks and, from the
first task that merges, the resident merge (base, task-vector store and model, laid out as the
job's memory plan says). After the IRT fit it also holds the job's `Fitness`.

Tasks (`evolve.execution` hands them out; each returns plain data):
- `endpoint(i)`: the base (i = 0) or model i - 1 on every benchmark in full (an adapter is first
  merged into a cached full folder); answers come from the per-machine response cache when there;
- `probe(genome, digest)`: a probe merge on every benchmark in full, cached under `digest`;
- `estimate(genome, priors)`: a candidate's estimated objectives (`CandidateScorer.estimate`);
- `full(genome)`: a candidate's exact objectives, on the merge an export writes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.cache import cache_dir, register_section, touch
from core.hashing import content_hash
from data.benchmarks import load_benchmark
from fitness.evaluate import Responses, evaluate_folder
from fitness.fitness import benchmark_paths, eval_settings
from merging.adapters import is_adapter
from merging.engine import merge

from .genome import SearchSpace
from .materialize import ResidentMerge, store_settings_for
from .plan import Plan, check_plan
from .problem import CandidateScorer
from .spec import EvolveSpec

register_section("endpoints", folder=True)  # adapters merged into full checkpoints


def endpoint_folder(base: Path, model: Path) -> Path:
    """A full model folder for an endpoint: the model itself, or an adapter merged once into the cache."""
    if not is_adapter(model):
        return model
    folder = cache_dir() / "endpoints" / hashlib.sha256(f"{content_hash(base)}:{content_hash(model)}".encode()).hexdigest()[:32]
    if folder.exists():
        touch(folder)  # used: `evomerge cache prune` removes the least recently used first
    else:
        merge({"base": base, "models": [{"name": "adapter", "path": model}], "method": "task_arithmetic",
               "device": "cpu"}, folder, progress=False)
    return folder


def search_space(spec: EvolveSpec) -> SearchSpace:
    """The job's search space (its layer blocks from the base's config)."""
    n_layers = json.loads((Path(spec.base) / "config.json").read_text()).get("num_hidden_layers", 1)
    blocks = spec.search.blocks if spec.search.granularity == "per_block" else 1
    return SearchSpace(spec.method, len(spec.models), spec.search.space, spec.params, blocks, n_layers)


def resident_merge(spec: EvolveSpec, plan: Plan) -> ResidentMerge:
    """The job's resident merge, laid out as its memory plan says (dtype, store kind and place)."""
    from core.devices import DTYPES

    ev = spec.evaluation
    store = store_settings_for(DTYPES[plan.dtype], plan.store_kind, ev.store_rank, ev.store_density)
    return ResidentMerge(spec.base, [m.path for m in spec.models], spec.method, device=spec.device, dtype=plan.dtype,
                         store=store, store_device="cpu" if plan.store_where == "host" else None,
                         reanchor_every=plan.reanchor_every, tokenizer=spec.tokenizer)


class Evaluator:
    """`spec`: the job's (its `device` the one this process evaluates on); `plan`: its memory
    plan, or None to plan here (a Ray actor plans against its own machine's free memory);
    `threads`: torch's CPU threads in this process (a Ray actor's CPUs), None to leave them."""

    def __init__(self, spec: EvolveSpec, plan: Plan | None = None, threads: int | None = None):
        from transformers import AutoTokenizer

        if threads:
            import torch

            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.plan = plan or check_plan(spec)
        self.ev = spec.evaluation.model_copy(update={"batch_size": self.plan.batch_size})  # auto: the plan's batch
        self.settings = eval_settings(self.ev, spec.device)
        self.benches = {str(p): load_benchmark(p) for p in benchmark_paths(spec.objectives)}
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base)
        self.space = search_space(spec)
        self._resident: ResidentMerge | None = None
        self.scorer: CandidateScorer | None = None

    @property
    def resident(self) -> ResidentMerge:
        """Built at the first task that merges (a job whose probes are all cached needs none before the search)."""
        if self._resident is None:
            self._resident = resident_merge(self.spec, self.plan)
        return self._resident

    @property
    def built(self) -> bool:
        return self._resident is not None

    def endpoint(self, i: int) -> dict[str, Responses]:
        folder = Path(self.spec.base) if i == 0 else endpoint_folder(Path(self.spec.base), Path(self.spec.models[i - 1].path))
        return {k: evaluate_folder(folder, b, self.settings, batch_size=self.ev.batch_size, device=self.spec.device)
                for k, b in self.benches.items()}

    def probe(self, x, digest: str) -> dict[str, Responses]:
        from fitness.evaluate import cached_responses, evaluate

        model = None

        def compute(b) -> Responses:
            nonlocal model
            if model is None:  # merged only when some answer is not cached
                model = self.resident.materialize(self.space.params_for_tensor(x))
            return evaluate(model, self.tokenizer, b, self.settings, batch_size=self.ev.batch_size,
                            device=self.spec.device)

        return {k: cached_responses(digest, b, self.settings, self.spec.device, lambda b=b: compute(b))
                for k, b in self.benches.items()}

    def set_fitness(self, fitness) -> None:
        """The job's fitness (IRT fits and subsets), fitted once by the driver and shared; it
        evaluates here with this process's tokenizer, device and batch."""
        import copy

        mine = copy.copy(fitness)
        mine.tokenizer, mine.device, mine.evaluation, mine.settings = (
            self.tokenizer, self.spec.device, self.ev, self.settings)
        self.scorer = CandidateScorer(self.space, self.resident, mine)

    def estimate(self, x, priors=None):
        return self.scorer.estimate(x, priors)

    def full(self, x) -> dict[str, float]:
        return self.scorer.full(x)

