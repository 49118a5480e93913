"""Registers `c2m3` and `weight_matching` in `merging.methods` (parameters, docs, needs_base=False).

They are not per-tensor functions: `merging.merge` hands them to `merging.permutation.merge`,
which reads the models whole. Their `fn` only raises when called per tensor (evolve cannot
use them).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..methods.registry import MethodParams, register


class PermutationParams(MethodParams):
    """Parameters of `c2m3` and `weight_matching` (unknown keys are errors)."""

    iterations: int | None = Field(None, ge=1, description="max iterations (c2m3: Frank-Wolfe, 200; "
                                                              "weight_matching: sweeps, 100)")
    repair: bool = Field(False, description="REPAIR the merged model's activations (needs `data`)")
    data: str | None = Field(None, description="REPAIR inputs: a .safetensors/.pt tensor file or a JSONL benchmark")
    repair_examples: int = Field(512, ge=1, description="how many inputs of `data` REPAIR uses")
    batch_size: int = Field(64, ge=1, description="REPAIR batch size")
    seed: int = Field(0, description="the seed of weight matching's random group order and of c2m3's Sinkhorn start")
    init: Literal["auto", "sinkhorn", "weight_matching", "identity"] = Field(
        "auto", description="c2m3's Frank-Wolfe start: auto runs sinkhorn and weight_matching and keeps the "
                            "higher objective")
    spec: str | None = Field(None, description="a permutation spec JSON file (else derived from config.json)")

    def check(self, n_models: int) -> None:
        super().check(n_models)
        if n_models < 2:
            raise ValueError("models: permutation merging needs at least two models")
        if self.repair and not self.data:
            raise ValueError("params.data: repair: true needs a dataset (a tensor file of inputs or a JSONL benchmark)")
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("params.weights: must be non-negative with a positive sum")


def _whole_models_only(base, deltas, params, name):
    raise ValueError("this method aligns whole models; run it through merging.merge (it has no per-tensor form)")


def _c2m3(base, deltas, params, name):
    """C2M3: cycle-consistent alignment of N models to a universe (Frank-Wolfe), then average (Crisostomi et al. 2024)."""
    return _whole_models_only(base, deltas, params, name)


def _weight_matching(base, deltas, params, name):
    """Weight matching: align every model to models[0] (Git Re-Basin, Ainsworth et al. 2023), then average."""
    return _whole_models_only(base, deltas, params, name)


register("c2m3", PermutationParams, needs_base=False)(_c2m3)
register("weight_matching", PermutationParams, needs_base=False)(_weight_matching)
