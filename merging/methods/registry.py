"""The registry of merge methods: name -> `Method` (its kind, parameters, search space, code).

A method is `fn(base, deltas, params, name) -> merged`: `base` is one parameter of the
base model, `deltas` the task vectors tau_i = theta_i - theta_base of that parameter
(one per input model, in the spec's order), all float32 on one device; `name` is the
tensor's name, used only where a method needs a per-tensor seed or treats some tensors
specially. Methods do no I/O; `merging.engine` streams tensors through them.

A method whose work splits into a parameter-free part and a cheap per-parameter part
(TSV's SVDs) also registers `prepare(deltas, name)`; its `fn`
then accepts either the raw deltas or what `prepare` returned, so a search that merges
the same tensors many times prepares them once (`evolve`) with identical results.

What lets an evolve job's resident merge (`evolve.materialize`) work in bounded memory:
`chunkable` methods give the same values on any run of a tensor's rows, given the
per-tensor `context` (TIES' trims, found over the whole tensor) and, for `positional` ones, the
run's flat offset (TIES' trims, DARE's masks); `coefficients` says the
method is linear, base + sum_i c_i x_i over its prepared vectors x_i, so that a candidate
can be written as an update of the previous one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.validation import error_message, field_path

MethodFn = Callable[[torch.Tensor, Sequence[torch.Tensor], "MethodParams", str], torch.Tensor]


class MethodParams(BaseModel):
    """Parameters shared by every method; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    weights: list[float] | None = Field(None, description="one weight per model, in the order of `models`")

    def check(self, n_models: int) -> None:
        """Checks per-model lists against the number of models; raises ValueError naming the field."""
        for key in type(self).model_fields:
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != n_models:
                raise ValueError(f"params.{key}: {len(value)} values for {n_models} models")

    def per_model(self, field: str, n: int, default: float) -> list[float]:
        value = getattr(self, field)
        if value is None:
            return [default] * n
        return list(value) if isinstance(value, list) else [float(value)] * n


MethodKind = Literal["tensor", "model", "training"]


@dataclass(frozen=True)
class Method:
    """Everything about one method, in one place.

    `kind`: `tensor` methods are `fn` over one tensor at a time (what `merging.merge` streams and an
    evolve job's resident merge writes); `model` methods align whole models first (c2m3,
    weight_matching) and `training` methods fine-tune (ATM): both run whole, through
    `run(spec, out_dir, *, overwrite, progress, card_extra, hooks) -> Path`.
    `space` is the default search space of an evolve job (parameter -> bounds); `sums`: the
    update is a sum of task vectors, not a mean (ATM's default scale is then 1/n);
    `check_models(params, models)` checks the spec's models where the default rule (every model
    has a `path`, none has `train` data) does not apply."""

    name: str
    params: type[BaseModel]
    kind: MethodKind = "tensor"
    fn: MethodFn | None = None
    run: Callable[..., Path] | None = None
    prepare: Callable[[Sequence[torch.Tensor], str], Any] | None = None
    needs_base: bool = True  # False: whole-model methods, `base` optional
    chunkable: bool = False  # fn gives the same values on any run of rows (with `context`'s result)
    positional: bool = False  # a chunkable fn that needs its run's flat index takes offset= (trims, masks)
    context: Callable[..., Any] | None = None  # (chunks, numel, params, name) -> ctx for fn(..., ctx=, offset=)
    coefficients: Callable[..., list[float]] | None = None  # (params, prepared) -> c_i: fn = base + sum_i c_i x_i
    version: int = 1  # bumped when fn's values change for the same parameters: no job resumes across it
    space: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    sums: bool = False
    check_models: Callable[[Any, Sequence[Any]], None] | None = None
    doc: str = ""  # one line for `evomerge methods`; default: the first line of fn's docstring

    @property
    def summary(self) -> str:
        return self.doc or (self.fn.__doc__ or "").strip().splitlines()[0]


METHODS: dict[str, Method] = {}


def add(method: Method) -> Method:
    """Registers a method (a `model` or `training` one; `register` below for `tensor` ones)."""
    if (method.kind == "tensor") != (method.fn is not None) or (method.kind != "tensor") != (method.run is not None):
        raise ValueError(f"method {method.name}: a tensor method has fn and no run, the others run and no fn")
    METHODS[method.name] = method
    return method


def register(name: str, params: type[MethodParams], **facts):
    """Decorator registering `fn` as the tensor method `name` (facts: the fields of `Method`)."""
    def deco(fn: MethodFn) -> MethodFn:
        add(Method(name, params, fn=fn, **facts))
        return fn

    return deco


def methods(kind: MethodKind) -> dict[str, Method]:
    return {n: m for n, m in METHODS.items() if m.kind == kind}


class UnknownMethod(ValueError):
    pass


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def method_params(method: str, params: dict[str, Any], n_models: int) -> MethodParams:
    """Validates `params` for `method`, strictly (numbers are numbers, not strings such as "NaN");
    errors name the field as params.<key>."""
    try:
        p = get_method(method).params.model_validate(params, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        field = field_path(err["loc"])
        raise ValueError(f"params.{field}: {error_message(err)} (method {method})") from None
    p.check(n_models)
    return p


def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i d_i, accumulated one tensor at a time (`deltas` may be a generator)."""
    out = None
    for w, d in zip(weights, deltas):
        out = torch.zeros_like(d) if out is None else out
        out.add_(d, alpha=w)
    return out
