"""Registers `c2m3` and `weight_matching` in `merging.methods` as `model` methods: they read the
models whole (`merging.permutation.merge`), so they run as merges, never per tensor (evolve).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.hooks import NO_HOOKS, Hooks

from ..methods.registry import Method, MethodParams, add


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


def _run(spec, out_dir, *, overwrite: bool = False, progress: bool = True, card_extra=None,
         hooks: Hooks = NO_HOOKS) -> Path:
    """Aligns and writes in one step (no progress events, nothing to stop between)."""
    from .merge import merge_permutation

    return merge_permutation(spec, out_dir, overwrite=overwrite, progress=progress, card_extra=card_extra)


add(Method("c2m3", PermutationParams, kind="model", needs_base=False, run=_run, doc=(
    "C2M3: cycle-consistent alignment of N models to a universe (Frank-Wolfe), then average (Crisostomi et al. 2024).")))
add(Method("weight_matching", PermutationParams, kind="model", needs_base=False, run=_run, doc=(
    "Weight matching: align every model to models[0] (Git Re-Basin, Ainsworth et al. 2023), then average.")))
