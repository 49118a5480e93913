"""The evolve part of the job spec (see ../shared/design.md, "One job spec")."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fitness.spec import EvaluationSpec, ObjectiveSpec
from merging.methods import get_method
from merging.spec import ModelRef, OutputSpec, check_device, method_params

from .search import ALGORITHMS_MULTI, ALGORITHMS_SINGLE


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    space: dict[str, tuple[float, float]] | None = Field(
        None, description="bounds per searched parameter; default: the method's usual space")
    granularity: Literal["global", "per_block"] = "global"
    blocks: int = Field(4, ge=1, le=256, description="layer blocks when granularity is per_block")
    algorithm: Literal[ALGORITHMS_MULTI + ALGORITHMS_SINGLE] = "nsga2"  # type: ignore[valid-type]
    population: int = Field(16, ge=2, le=10_000)
    generations: int = Field(8, ge=1, le=10_000)
    seed: int = 0


class EvolveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["evolve"] = "evolve"
    base: Path
    models: list[ModelRef] = Field(..., min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict, description="fixed (not searched) method parameters")
    search: SearchSpec = Field(default_factory=SearchSpec)
    objectives: list[ObjectiveSpec] = Field(..., min_length=1, max_length=16)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    final_check: bool = True
    output: OutputSpec = Field(default_factory=OutputSpec)
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        get_method(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "EvolveSpec":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: names must be unique")
        labels = [o.label for o in self.objectives]
        if len(set(labels)) != len(labels):
            raise ValueError("objectives: two objectives measure the same thing (give them distinct names)")
        method_params(self.method, self.params, len(self.models))
        n_obj = len(self.objectives)
        if n_obj > 1 and self.search.algorithm in ALGORITHMS_SINGLE:
            raise ValueError(f"search.algorithm: {self.search.algorithm} optimizes one objective, the spec has {n_obj}")
        if n_obj == 1 and self.search.algorithm in ("nsga3", "smsemoa", "moead"):
            raise ValueError(f"search.algorithm: {self.search.algorithm} needs several objectives")
        from .genome import SearchSpace

        SearchSpace(self.method, len(self.models), self.search.space, self.params,
                    self.search.blocks if self.search.granularity == "per_block" else 1)
        return self
