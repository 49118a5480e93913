"""The fitness part of a job spec: objectives, subsets, evaluation and IRT settings."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ESTIMATOR_NAMES = ("subset_mean", "p_irt", "gp_irt", "mp_irt", "gmp_irt", "full")


class SubsetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(20, ge=1, le=100_000, description="items per benchmark evaluated per candidate")
    strategy: Literal["random", "anchor", "entropy"] = Field(
        "random", description="random (the default: the least biased in bench/evolve_ablation.py), anchor or entropy")
    seed: int = 0


class ObjectiveSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    benchmark: Path = Field(..., description="JSONL benchmark file")
    metric: Literal["accuracy", "mean_output_tokens"] = "accuracy"
    estimator: Literal[ESTIMATOR_NAMES] = "gmp_irt"  # type: ignore[valid-type]
    subset: SubsetSpec = Field(default_factory=SubsetSpec)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]+$", max_length=128)

    @model_validator(mode="after")
    def _metric_estimator(self) -> "ObjectiveSpec":
        if self.metric == "mean_output_tokens" and self.estimator not in ("subset_mean", "full"):
            raise ValueError(f"estimator: mean_output_tokens is estimated by subset_mean or full, not {self.estimator}")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.benchmark.stem}:{self.metric}"


class IrtSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["1pl", "2pl", "multidim_2pl"] = "2pl"
    dims: int = Field(1, ge=1, le=8)
    epochs: int = Field(600, ge=10, le=20_000)
    probes: int = Field(11, ge=0, le=200, description="probe merges evaluated in full to enrich the IRT fit")
    seed: int = 42
    params_file: Path | None = Field(None, description="import fitted item parameters instead of fitting")


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=4096)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    mc_norm: Literal["sum", "mean"] = "sum"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(64, ge=1, le=4096)
    irt: IrtSpec = Field(default_factory=IrtSpec)
