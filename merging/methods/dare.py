"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): Drop And REscale.

Each entry of each task vector is dropped with probability 1 - density and the kept ones
are rescaled by 1 / density, so the expected task vector is unchanged:

    tau_i' = m_i * tau_i / density_i,   m_i ~ Bernoulli(density_i)

then combined linearly (`dare_linear`: base + lambda * sum_i w_i tau_i') or with TIES'
sign election and disjoint mean (`dare_ties`). The masks are reproducible: entry j of model i's
mask is a counter-based draw (`merging.draws`) of stream (seed, tensor name, i), so it is the same
on every device and thread count, and whatever run of rows it is merged in (`chunkable`).
Defaults: density 0.5, weights 1, lambda 1, seed 0. Version 2: version 1 drew the masks with
torch's stateful generator, a tensor at a time (other masks for the same seed).
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..draws import keep_scaled, stream_key
from .registry import register, weighted_sum
from .ties import TiesParams, disjoint_merge


class DareParams(TiesParams):
    density: float | list[float] = Field(0.5, description="probability of keeping each entry")
    seed: int = 0
    normalize: bool | None = Field(None, description="divide by the (agreeing) weights' sum; default: true for "
                                   "dare_ties (the disjoint mean), false for dare_linear (the weighted sum)")


def _dropped(deltas, p: DareParams, name: str, offset: int):
    dens = p.per_model("density", len(deltas), 0.5)
    return (keep_scaled(t, stream_key(p.seed, name, i), d, offset) for i, (t, d) in enumerate(zip(deltas, dens)))


SPACE = {"weights": (0.0, 1.0), "density": (0.1, 1.0)}


@register("dare_linear", DareParams, chunkable=True, positional=True, version=2, space=SPACE, sums=True)
def dare_linear(base: torch.Tensor, deltas, p: DareParams, name: str, offset: int = 0) -> torch.Tensor:
    """Random drop and rescale, then task arithmetic."""
    w = p.per_model("weights", len(deltas), 1.0)
    total = sum(w) if p.normalize and abs(sum(w)) >= 1e-8 else 1.0  # mergekit's divisor rule
    return base + (p.lambda_ / total) * weighted_sum(_dropped(deltas, p, name, offset), w)


@register("dare_ties", DareParams, chunkable=True, positional=True, version=2, space=SPACE)
def dare_ties(base: torch.Tensor, deltas, p: DareParams, name: str, offset: int = 0) -> torch.Tensor:
    """Random drop and rescale, then TIES sign election and disjoint mean."""
    dropped = list(_dropped(deltas, p, name, offset))
    return base + p.lambda_ * disjoint_merge(dropped, p.per_model("weights", len(deltas), 1.0), p.normalize is not False)
