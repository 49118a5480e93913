"""The fitness part of a job spec: objectives, subsets, evaluation and IRT settings."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from core.validation import GivenPath

ESTIMATOR_NAMES = ("auto", "subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt", "map_irt", "blend_irt", "full")


ADAPTIVE_FIELDS = ("round", "prior", "stop_sd", "min_sd")


class SubsetSpec(BaseModel):
    """Which items a candidate answers. ``random``, ``anchor`` and ``entropy`` fix one subset of
    ``size`` items per benchmark before the search (``fitness.subsets``); ``adaptive`` chooses each
    candidate's items in rounds from its own answers (computerized adaptive testing,
    ``fitness.adaptive``), ``size`` being the item budget; ``auto`` (with ``estimator: auto``)
    is one of the two, chosen per benchmark at job start (``fitness.fitness.choose_estimator``).
    ``round``, ``prior``, ``stop_sd`` and ``min_sd`` belong to ``adaptive`` and ``auto`` only; left
    out they take ``fitness.adaptive``'s defaults and stay out of the spec's serialized form (so
    fingerprints of fixed-subset jobs do not change)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(20, ge=1, le=100_000, description="items per benchmark evaluated per candidate (adaptive: the budget)")
    strategy: Literal["random", "balanced", "anchor", "entropy", "adaptive", "auto"] = Field(
        "random", description="in an objective left out: auto for accuracy, random for mean_output_tokens "
                              "(fitness.spec.default_fitness). auto (estimator auto: adaptive or random, "
                              "whichever erred less on the known rows), random (stratified), balanced (the random draw, of 300, on which the endpoints "
                              "and probes score closest to their full accuracies: lower estimation error in "
                              "bench/fitness_estimators.py), anchor, entropy, or adaptive (CAT: items chosen per "
                              "candidate)")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    round: int | None = Field(None, ge=1, le=100_000, description="adaptive: items per round per benchmark (default 5)")
    prior: Literal["endpoints", "population", "surrogate"] | None = Field(
        None, description="adaptive: prior on ability from the endpoint models (default), from the "
                          "candidates already scored in this job, or the search's surrogate: a Gaussian process "
                          "over genomes predicting this candidate's ability from the probes and candidates scored")
    stop_sd: float | None = Field(None, ge=0.0, le=1.0, description="adaptive: stop once the predicted accuracy's "
                                                                     "posterior sd is below this (default 0: never)")
    min_sd: float | None = Field(None, gt=0.0, le=100.0, description="adaptive: floor on the prior's sd in ability "
                                                                    "units (default 0.5; 1.0 for the surrogate prior)")

    @model_validator(mode="after")
    def _adaptive_only(self) -> "SubsetSpec":
        if self.strategy not in ("adaptive", "auto"):
            for name in ADAPTIVE_FIELDS:
                if getattr(self, name) is not None:
                    raise ValueError(f"subset.{name} applies to strategy adaptive (or auto) only, not {self.strategy}")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_adaptive(self, handler):
        data = handler(self)
        for name in ADAPTIVE_FIELDS:
            if isinstance(data, dict) and data.get(name) is None:
                data.pop(name, None)
        return data

    def adaptive_settings(self) -> dict:
        """round, prior, stop_sd, min_sd with the defaults filled in."""
        from .adaptive import DEFAULT_MIN_SD, DEFAULT_ROUND, DEFAULT_STOP_SD

        return {"round": self.round or DEFAULT_ROUND, "prior": self.prior or "endpoints",
                "stop_sd": DEFAULT_STOP_SD if self.stop_sd is None else self.stop_sd,
                "min_sd": self.min_sd or DEFAULT_MIN_SD}


def share_subsets(objectives: list) -> list:
    """Objectives on one benchmark answer the same items, so they share one subset spec: one that
    leaves it out takes its siblings' (when they give exactly one), and a benchmark with a
    mean_output_tokens objective and no subset given gets a fixed random subset for all of them
    (lengths on adaptive items, chosen for their difficulty, would be biased)."""
    raw = [o for o in objectives if isinstance(o, dict)]
    for bench in {str(o.get("benchmark")) for o in raw}:
        mine = [o for o in raw if str(o.get("benchmark")) == bench]
        given = [o["subset"] for o in mine if o.get("subset") is not None]
        shared = None
        if len({repr(g) for g in given}) == 1:
            shared = given[0]
        elif not given and any(o.get("metric") == "mean_output_tokens" for o in mine):
            shared = {"strategy": "random"}
        if shared is not None:
            objectives = [{**o, "subset": shared} if any(o is m for m in mine) and o.get("subset") is None else o
                          for o in objectives]
    return objectives


def default_fitness(metric: str, estimator: str | None, strategy: str | None) -> tuple[str, str]:
    """(estimator, subset strategy) for an objective that may leave either out.

    Accuracy objectives default to ``auto``: per benchmark, adaptive items scored by p-IRT (its
    estimates mapped by a line fitted on the probes, or not) or ``blend_irt`` on a stratified
    random subset, by their leave-one-out errors on the probes (`fitness.fitness.choose_estimator`). Neither wins everywhere: on the zoo's nearly
    deterministic answers the CAT has the lowest error (bench/fitness_estimators.py) and the best
    true hypervolume of the search (bench/evolve_ablation.py), on simulated real answers with item
    parameters from a job's few rows it stops improving after 10 items and the blend is at or
    below the subset mean at every k (bench/fitness_simulated.py). An objective that names its
    estimator but no strategy gets a fixed random subset; one that names ``auto`` takes strategy
    ``auto``, and a subset of strategy ``auto`` takes estimator ``auto``; a subset that sets the
    CAT's settings (``round``, ``prior``, ``stop_sd``, ``min_sd``) and no strategy is adaptive,
    unless the estimator is ``auto``. An adaptive subset given no
    estimator takes p-IRT (subset-mean blends are biased on items chosen near the candidate's
    ability); a fixed subset given no estimator takes MERGE^3's gmp-IRT. IRT models correctness,
    not lengths, so a mean_output_tokens objective takes the subset mean on a fixed random subset."""
    if metric == "mean_output_tokens":
        return estimator or "subset_mean", strategy or "random"
    if strategy is None:
        strategy = "auto" if estimator in (None, "auto") else "random"
    if estimator is None:
        estimator = {"auto": "auto", "adaptive": "p_irt"}.get(strategy, "gmp_irt")
    return estimator, strategy


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: GivenPath = Field(..., description="JSONL benchmark file")
    metric: Literal["accuracy", "mean_output_tokens"] = "accuracy"
    estimator: Literal[ESTIMATOR_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="left out: auto for accuracy (per benchmark, p_irt on adaptive items, with or "
                            "without a line fitted on the probes, or blend_irt on a random subset, by their "
                            "leave-one-out errors on the probes: fitness.fitness.choose_estimator), p_irt on "
                            "adaptive subsets, gmp_irt on fixed ones, subset_mean for mean_output_tokens "
                            "(fitness.spec.default_fitness)")
    subset: SubsetSpec = Field(default_factory=SubsetSpec)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]+$", max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fills what the spec leaves out (see `default_fitness`)."""
        if not isinstance(data, dict):
            return data
        sub = data.get("subset")
        if isinstance(sub, SubsetSpec):
            sub = sub.model_dump(exclude_unset=True)
        strategy = sub.get("strategy") if isinstance(sub, dict) else None
        if strategy is None and data.get("estimator") != "auto" and isinstance(sub, dict) and any(
                sub.get(name) is not None for name in ADAPTIVE_FIELDS):
            strategy = "adaptive"  # CAT settings given: adaptive items were meant
        estimator, strategy = default_fitness(data.get("metric", "accuracy"), data.get("estimator"), strategy)
        return {**data, "estimator": estimator, "subset": {**(sub if isinstance(sub, dict) else {}), "strategy": strategy}}

    @model_validator(mode="after")
    def _metric_estimator(self) -> "ObjectiveSpec":
        if self.metric == "mean_output_tokens" and self.estimator not in ("subset_mean", "full"):
            raise ValueError(f"estimator: mean_output_tokens is estimated by subset_mean or full, not {self.estimator}")
        if self.metric == "accuracy" and (self.estimator == "auto") != (self.subset.strategy == "auto"):
            raise ValueError("estimator: auto chooses the subset strategy too (adaptive or random): give estimator "
                             "auto with subset.strategy auto or left out, or neither")
        if self.estimator == "blend_irt" and self.subset.strategy == "adaptive":
            raise ValueError("estimator: blend_irt weighs the subset mean, which items chosen per candidate bias; "
                             "give it a fixed subset (subset.strategy random or balanced)")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.benchmark.stem}:{self.metric}"


class IrtSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["1pl", "2pl", "multidim_2pl"] = "2pl"
    dims: int = Field(1, ge=1, le=8)
    fitter: Literal["map", "py-irt"] = Field(
        "map", description="map: joint MAP by L-BFGS (the default: deterministic, fast, the lower error in "
                           "bench/fitness_estimators.py); py-irt: pyro's variational fit, as tinyBenchmarks and MERGE^3")
    epochs: int = Field(600, ge=10, le=20_000, description="py-irt fitter only: SVI epochs")
    probes: int = Field(11, ge=0, le=200, description="probe merges evaluated in full to enrich the IRT fit: random merges of the "
                                                          "job's method, a Latin hypercube over its search space")
    more_probes: int = Field(24, ge=0, le=200, description="probes a job may add after the first, in batches of "
                             "probe_batch, while the last batch lowered the leave-one-out CAT errors on the earlier "
                             "probes beyond noise and all probes cost at most probe_share of the search's items "
                             "(fitness.probes); 0: exactly `probes`")
    probe_batch: int = Field(4, ge=1, le=64, description="probes added at a time (see more_probes)")
    probe_share: float = Field(0.5, ge=0.0, le=100.0, description="the most all probes' items may be, as a share of "
                               "the items the search scores (candidates x subset size, summed over benchmarks)")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    params_file: GivenPath | None = Field(None, description="import fitted item parameters instead of fitting")


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=4096)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    mc_norm: Literal["sum", "mean"] = "sum"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the resident model and of every evaluated model: auto is bfloat16 on CUDA, "
                            "float32 on CPU (where bfloat16 matmuls are slow)")
    batch_size: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        64, description="sequences per forward pass; auto: the largest the job's memory plan fits next to the "
                        "resident model (evolve.plan), at most 256")
    store: Literal["auto", "dense", "lowrank", "sparse"] = Field(
        "auto", description="how the resident merge keeps the task vectors (merging.store): dense (the evaluation "
                            "dtype's precision), lowrank (truncated SVD per matrix, store_rank of the rank), sparse "
                            "(top store_density of the entries, bitmask + values); auto: dense when the memory "
                            "plan says it fits, else lowrank, else sparse")
    store_rank: float = Field(0.1, gt=0.0, le=1.0, description="lowrank store: fraction of min(rows, cols) kept per matrix")
    store_density: float = Field(0.1, gt=0.0, le=1.0, description="sparse store: fraction of entries kept per matrix")
    reanchor_every: int | None = Field(
        None, ge=1, le=1_000_000, description="candidates between fresh materializations from the base; the ones "
                                              "between are written as updates of the previous candidate (no copy of "
                                              "the base kept). Default: 1 on CPU (every candidate fresh and exact), "
                                              "16 on CUDA (the base is read from disk only every 16th)")
    irt: IrtSpec = Field(default_factory=IrtSpec)
