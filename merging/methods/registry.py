"""The registry of merge methods: name -> (pure function over one tensor, its parameters).

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
per-tensor `context` (TIES' trims, found over the whole tensor); `coefficients` says the
method is linear, base + sum_i c_i x_i over its prepared vectors x_i, so that a candidate
can be written as an update of the previous one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

MethodFn = Callable[[torch.Tensor, Sequence[torch.Tensor], "MethodParams", str], torch.Tensor]


class MethodParams(BaseModel):
    """Parameters shared by every method; unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    weights: list[float] | None = Field(None, description="one weight per model, in the order of `models`")

    def check(self, n_models: int) -> None:
        """Checks per-model lists against the number of models; raises ValueError naming the field."""
        for field in type(self).model_fields:
            value = getattr(self, field)
            if isinstance(value, list) and len(value) != n_models:
                raise ValueError(f"params.{field}: {len(value)} values for {n_models} models")

    def per_model(self, field: str, n: int, default: float) -> list[float]:
        value = getattr(self, field)
        if value is None:
            return [default] * n
        return list(value) if isinstance(value, list) else [float(value)] * n


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    params: type[MethodParams]
    prepare: Callable[[Sequence[torch.Tensor], str], Any] | None = None
    needs_base: bool = True  # False: whole-model methods (c2m3, weight_matching), `base` optional
    chunkable: bool = False  # fn gives the same values on any run of rows (with `context`'s result)
    context: Callable[..., Any] | None = None  # (chunks, numel, params, name) -> ctx for fn(..., ctx=, offset=)
    coefficients: Callable[..., list[float]] | None = None  # (params, prepared) -> c_i: fn = base + sum_i c_i x_i

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


METHODS: dict[str, Method] = {}
WHOLE_MODEL_METHODS: dict[str, Method] = {}  # c2m3, weight_matching: merging.permutation


def register(name: str, params: type[MethodParams], prepare=None, needs_base: bool = True, chunkable: bool = False,
             context=None, coefficients=None):
    def deco(fn: MethodFn) -> MethodFn:
        # whole-model methods (no per-tensor form) live apart, so per-tensor users of METHODS skip them
        (METHODS if needs_base else WHOLE_MODEL_METHODS)[name] = Method(
            name, fn, params, prepare, needs_base, chunkable, context, coefficients)
        return fn

    return deco


class UnknownMethod(ValueError):
    pass


def get_method(name: str) -> Method:
    try:
        return METHODS[name] if name in METHODS else WHOLE_MODEL_METHODS[name]
    except KeyError:
        known = ", ".join(sorted([*METHODS, *WHOLE_MODEL_METHODS]))
        raise UnknownMethod(f"unknown method {name!r}; known: {known}") from None


def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i d_i, accumulated one tensor at a time (`deltas` may be a generator)."""
    out = None
    for w, d in zip(weights, deltas):
        out = torch.zeros_like(d) if out is None else out
        out.add_(d, alpha=w)
    return out
