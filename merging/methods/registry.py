"""The registry of merge methods: name -> (pure function over one tensor, its parameters).

A method is `fn(base, deltas, params, name) -> merged`: `base` is one parameter of the
base model, `deltas` the task vectors tau_i = theta_i - theta_base of that parameter
(one per input model, in the spec's order), all float32 on one device; `name` is the
tensor's name, used only where a method needs a per-tensor seed or treats some tensors
specially. Methods do no I/O; `merging.engine` streams tensors through them.

A method whose work splits into a parameter-free part and a cheap per-parameter part
(TSV's SVDs, TIES' magnitude ranks) also registers `prepare(deltas, name)`; its `fn`
then accepts either the raw deltas or what `prepare` returned, so a search that merges
the same tensors many times prepares them once (`evolve`) with identical results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
                raise ValueError(f"params.{field} has {len(value)} values for {n_models} models")

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

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


METHODS: dict[str, Method] = {}


def register(name: str, params: type[MethodParams], prepare=None):
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, params, prepare)
        return fn

    return deco


class UnknownMethod(ValueError):
    pass


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(deltas[0])
    for w, d in zip(weights, deltas):
        out.add_(d, alpha=w)
    return out
