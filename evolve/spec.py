"""The evolve part of the job spec (reference: docs/spec.md)."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fitness.spec import EvaluationSpec, ObjectiveSpec, share_subsets
from merging.spec import JobBase

from .search import ALGORITHMS_MULTI, ALGORITHMS_SINGLE, BO_MAX_BUDGET, default_algorithm


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    space: dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="bounds per searched parameter; default: the method's usual space")
    granularity: Literal["global", "per_block"] = "global"
    blocks: int = Field(4, ge=1, le=256, description="layer blocks when granularity is per_block")
    algorithm: Literal[ALGORITHMS_MULTI + ALGORITHMS_SINGLE] | None = Field(  # type: ignore[valid-type]
        None, description=f"default: bo when population x generations <= {BO_MAX_BUDGET}, nsga2 above")
    population: int = Field(16, ge=2, le=10_000, description="genomes per generation; bo: the budget is "
                            "population x generations candidates")
    generations: int = Field(8, ge=1, le=10_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    batch: int = Field(1, ge=1, le=256, description="bo: genomes proposed at once (the number of parallel "
                       "evaluators; 1 on one GPU)")
    trust_region: Literal["auto", "on", "off"] = Field(
        "auto", description="bo: maximize the acquisition in a TuRBO trust region; auto: above 12 searched genes")

    @model_validator(mode="after")
    def _default_algorithm(self) -> "SearchSpec":
        if self.algorithm is None:
            self.algorithm = default_algorithm(self.population, self.generations)
        return self


class ExecutionSpec(BaseModel):
    """Where the job's evaluations run (evolve/execution.py): in the job's process, or on N Ray
    actors, each holding its own resident merge."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "ray"] = "local"
    address: str = Field("auto", pattern=r"^(auto|local|(ray://)?[A-Za-z0-9_.-]+:\d{1,5})$",
                         description="ray: auto (the cluster this machine runs, or RAY_ADDRESS), local (start one "
                                     "here), ray://HOST:PORT or HOST:PORT")
    evaluators: int = Field(1, ge=1, le=1024, description="ray: actors scoring candidates in parallel")
    gpus_per_evaluator: float | None = Field(None, ge=0, le=16, description="ray: default 1 when the job's device "
                                             "is cuda, or auto and the cluster has GPUs; else 0")
    cpus_per_evaluator: float = Field(1, gt=0, le=256, description="ray: CPU threads per evaluator")

    @model_validator(mode="after")
    def _backend(self, info: ValidationInfo) -> "ExecutionSpec":
        if self.backend == "local" and self.evaluators > 1:
            raise ValueError("execution.evaluators: the local backend runs one evaluator; use backend: ray for more")
        if self.backend == "ray" and not (info.context or {}).get("recorded"):  # a run's spec.json: read, not run
            from .execution import RAY_MISSING, ray_available

            if not ray_available():
                raise ValueError(RAY_MISSING)
        return self


class FinalCheckSpec(BaseModel):
    """Which members of the final front are evaluated in full after the search."""

    model_config = ConfigDict(extra="forbid")

    members: Literal["all"] | Annotated[int, Field(ge=1, le=10_000)] = Field(
        8, description="all, or at most K members: the knee, the best member on each objective, then members "
                       "evenly spaced on the front")


class EvolveSpec(JobBase):
    """A Pareto search over the method's parameters; `params` are the fixed (not searched) ones."""

    kind: Literal["evolve"] = "evolve"
    tensor_methods_only: ClassVar[bool] = True
    search: SearchSpec = Field(default_factory=SearchSpec)
    objectives: list[ObjectiveSpec] = Field(..., min_length=1, max_length=16)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    final_check: FinalCheckSpec | None = Field(default_factory=FinalCheckSpec,
                                               description="true (the default members), false (none) or {members}")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    @field_validator("final_check", mode="before")
    @classmethod
    def _final_check_bool(cls, v):
        return {} if v is True else None if v is False else v

    @model_validator(mode="before")
    @classmethod
    def _shared_subsets(cls, data):
        if isinstance(data, dict) and isinstance(data.get("objectives"), list):
            return {**data, "objectives": share_subsets(data["objectives"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "EvolveSpec":
        if self.tokenizer == "union":
            raise ValueError("tokenizer: union writes a model with a new vocabulary, a merge job's work; evolve with "
                             "tokenizer: base, or merge the vocabularies first")
        labels = [o.label for o in self.objectives]
        if len(set(labels)) != len(labels):
            raise ValueError("objectives: two objectives measure the same thing (give them distinct names)")
        for i, o in enumerate(self.objectives):
            first = next(p for p in self.objectives if p.benchmark == o.benchmark)
            if o.subset != first.subset:
                raise ValueError(f"objectives[{i}].subset: objectives on {o.benchmark.name} answer the same items, "
                                 f"so they need the same subset spec")
        if self.execution.backend == "ray" and self.search.algorithm == "bo" and "batch" not in \
                self.search.model_fields_set:
            self.search.batch = min(self.execution.evaluators, 256)  # q = N: every evaluator gets a genome per ask
        n_obj = len(self.objectives)
        if n_obj > 1 and self.search.algorithm in ALGORITHMS_SINGLE:
            raise ValueError(f"search.algorithm: {self.search.algorithm} optimizes one objective, the spec has {n_obj}")
        if n_obj == 1 and self.search.algorithm in ("nsga3", "smsemoa", "moead"):
            raise ValueError(f"search.algorithm: {self.search.algorithm} needs several objectives")
        from .genome import SearchSpace

        SearchSpace(self.method, len(self.models), self.search.space, self.params,
                    self.search.blocks if self.search.granularity == "per_block" else 1)
        return self
