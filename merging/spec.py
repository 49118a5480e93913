"""The merge part of the job spec (reference: docs/spec.md).

`MergeSpec` is what `evomerge merge SPEC.yaml`, `merging.merge(spec, out)` and the REST
API's `kind: merge` jobs accept. Method parameters are validated by the method's own
parameter model, so an unknown key or an out-of-range value names its field.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core.validation import GivenPath, field_path, non_finite, off_schema

from .checkpoint import parse_size
from .methods.registry import MethodParams, get_method, method_params


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    path: GivenPath | None = Field(None, description="fine-tuned folder or LoRA adapter; optional for method atm")
    train: GivenPath | None = Field(None, description="method atm: training JSONL (benchmark format) for this model's task")


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


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


def check_device(v: str) -> str:
    if not re.fullmatch(DEVICE_PATTERN, v):
        raise off_schema(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


Device = Annotated[str, Field(json_schema_extra={"pattern": DEVICE_PATTERN}), AfterValidator(check_device)]


def _schema_of_job(schema: dict[str, Any], cls: type) -> None:
    """A job's JSON schema as clients need it: the methods it may name as an enum, and `kind`,
    the job spec union's tag, required (Python and YAML callers may leave it to its default)."""
    from .methods.registry import METHODS

    schema["properties"]["method"]["enum"] = sorted(
        n for n, m in METHODS.items() if m.kind == "tensor" or not cls.tensor_methods_only)
    if "kind" in schema["properties"]:
        schema["required"] = ["kind", *schema.get("required", [])]


class JobBase(BaseModel):
    """What every job names: the base, the models, the method, where it runs and how it is saved."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_schema_of_job)
    tensor_methods_only: ClassVar[bool] = False  # a job that writes candidates tensor by tensor (evolve)

    base: GivenPath | None = Field(None, description="required except for methods that align whole models (c2m3, ...)")
    models: list[ModelRef] = Field(..., min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    device: Device = "auto"
    tokenizer: Literal["base", "union"] | None = Field(
        None, description="models whose vocabularies differ from the base's: base (keep the base's tokens) or union "
                          "(add the models' tokens; merge jobs only); see merging/vocab.py")

    @field_validator("params")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = non_finite(v)
        if bad is not None:
            raise ValueError(f"{field_path(('params',) + bad)}: must be a finite number (not NaN or infinity)")
        return v

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            get_method(v)
        except ValueError as e:
            raise off_schema(str(e)) from None
        return v

    @model_validator(mode="after")
    def _params(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: names must be unique")
        method = get_method(self.method)
        if self.base is None and method.needs_base:
            raise ValueError(f"base: required for method {self.method}")
        if self.tensor_methods_only and method.kind != "tensor":
            raise ValueError(f"method: {self.method} " + (
                "aligns whole models and runs as kind: merge only" if method.kind == "model" else
                "runs as kind: merge (its output can then be a model of an evolve job)"))
        p = method_params(self.method, self.params, len(self.models))
        if method.check_models is not None:
            method.check_models(p, self.models)
            return self
        for i, m in enumerate(self.models):
            if m.path is None:
                raise ValueError(f"models[{i}].path: required for method {self.method} (only atm trains from data)")
            if m.train is not None:
                raise ValueError(f"models[{i}].train: only method atm trains; {self.method} merges the models' paths")
        return self

    def method_params(self) -> MethodParams:
        return method_params(self.method, self.params, len(self.models))


class MergeSpec(JobBase):
    """One merge with fixed parameters."""

    kind: Literal["merge"] = "merge"
