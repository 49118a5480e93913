"""The merge part of the job spec (see ../shared/design.md, "One job spec").

`MergeSpec` is what `evomerge merge SPEC.yaml`, `merging.merge(spec, out)` and the REST
API's `kind: merge` jobs accept. Method parameters are validated by the method's own
parameter model, so an unknown key or an out-of-range value names its field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checkpoint import parse_size
from .methods import MethodParams, get_method


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of floating tensors in the output; default: the base's"
    )
    max_shard_size: str | int = "2GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v


def check_device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


class JobBase(BaseModel):
    """What every job names: the base, the models, the method, where it runs and how it is saved."""

    model_config = ConfigDict(extra="forbid")

    base: Path
    models: list[ModelRef] = Field(..., min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
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
    def _params(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: names must be unique")
        method_params(self.method, self.params, len(self.models))
        return self

    def method_params(self) -> MethodParams:
        return method_params(self.method, self.params, len(self.models))


class MergeSpec(JobBase):
    """One merge with fixed parameters."""

    kind: Literal["merge"] = "merge"


def method_params(self) -> MethodParams:
        return method_params(self.method, self.params, len(self.models))


def method_params(method: str, params: dict[str, Any], n_models: int) -> MethodParams:
    """Validates `params` for `method`; errors name the field as params.<key>."""
    cls = get_method(method).params
    try:
        p = cls.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"params.{field}: {err['msg']} (method {method})") from None
    p.check(n_models)
    return p
