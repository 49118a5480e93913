"""The merge part of the job spec (see ../shared/design.md, "One job spec").

`MergeSpec` is what `evomerge merge SPEC.yaml`, `merging.merge(spec, out)` and the REST
API's `kind: merge` jobs accept. Method parameters are validated by the method's own
parameter model, so an unknown key or an out-of-range value names its field.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checkpoint import parse_size
from .methods import MethodParams, get_method


def non_finite(data: Any, loc: tuple = ()) -> tuple | None:
    """Where the first NaN or infinite number sits in nested dicts and lists (None if nowhere)."""
    if isinstance(data, float) and not math.isfinite(data):
        return loc
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, loc + (k,))
        if found is not None:
            return found
    return None


def field_path(loc) -> str:
    """('models', 1, 'path') -> 'models[1].path'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _not_empty(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")  # Path("") would silently be "." (the working folder)
    return value


# A path given as text: "" is refused instead of becoming ".".
GivenPath = Annotated[Path, BeforeValidator(_not_empty)]


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


def check_device(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


class JobBase(BaseModel):
    """What every job names: the base, the models, the method, where it runs and how it is saved."""

    model_config = ConfigDict(extra="forbid")

    base: GivenPath | None = Field(None, description="required except for methods that align whole models (c2m3, ...)")
    models: list[ModelRef] = Field(..., min_length=1)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

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
        if v != "atm":  # ATM trains, so it is not a per-tensor method (merging/atm.py)
            get_method(v)
        return v

    @model_validator(mode="after")
    def _params(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: names must be unique")
        if self.base is None and (self.method == "atm" or get_method(self.method).needs_base):
            raise ValueError(f"base: required for method {self.method}")
        if self.method != "atm" and not get_method(self.method).needs_base and getattr(self, "kind", "merge") != "merge":
            raise ValueError(f"method: {self.method} aligns whole models and runs as kind: merge only")
        p = method_params(self.method, self.params, len(self.models))
        if self.method == "atm":
            from .atm import check_models

            if getattr(self, "kind", "merge") != "merge":
                raise ValueError("method: atm runs as kind: merge (its output can then be a model of an evolve job)")
            check_models(p, self.models)
        else:
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


def method_params(method: str, params: dict[str, Any], n_models: int) -> MethodParams:
    """Validates `params` for `method`; errors name the field as params.<key>."""
    if method == "atm":
        from .atm import AtmParams

        cls = AtmParams
    else:
        cls = get_method(method).params
    try:
        p = cls.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"params.{field}: {err['msg']} (method {method})") from None
    p.check(n_models)
    return p
