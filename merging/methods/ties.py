"""TIES-merging (Yadav et al., NeurIPS 2023, "TIES-Merging: Resolving Interference When Merging Models").

Three steps per parameter (paper, Algorithm 1):
1. Trim: keep the top-k entries of each tau_i by magnitude, k = int(density_i * numel)
   (ties at the k-th magnitude taken in index order).
2. Elect sign: gamma = sign(sum_i w_i * trimmed_i); a sum of exactly 0 counts as +.
3. Disjoint merge: average only the entries that agree with gamma,
       tau_m = sum_i w_i t_i [sign(t_i) = gamma] / sum_i w_i [sign(t_i) = gamma]
   (the divisor is 1 where no model agrees), then theta = base + lambda * tau_m.

Weights multiply the trimmed vectors before the sign election and normalize the disjoint
mean, as in mergekit's `ties` (normalize: true), so that equal parameters give equal
results; `normalize: false` keeps the agreeing weighted sum (mergekit's normalize: false).
Defaults: density 0.2 (the paper keeps the top 20%), weights 1, lambda 1, normalize true.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import Field, field_validator

from ..selection import Chunks, Trim, find_trim, keep_mask
from .registry import MethodParams, register


class TiesParams(MethodParams):
    density: float | list[float] = Field(0.2, description="fraction of each task vector kept (one value or one per model)")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = Field(True, description="divide the agreeing weighted sum by the agreeing weights (the "
                            "disjoint mean); false: the sum (mergekit's normalize)")

    @field_validator("density")
    @classmethod
    def _in_unit_interval(cls, v):
        for d in v if isinstance(v, list) else [v]:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"density must lie in (0, 1], got {d}")
        return v


def apply_trim(tau: torch.Tensor, trim: Trim, offset: int = 0) -> torch.Tensor:
    """tau with the entries `trim` drops set to 0; `tau` may be a slice starting at flat `offset`."""
    return tau if trim.threshold < 0 else tau * keep_mask(tau, trim, offset)


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps exactly k = int(density * numel) entries of largest magnitude, zeroes the rest.

    Entries tied at the k-th largest magnitude are taken in index order, so the result is
    deterministic on every device (a sort's order among equal keys is not; bfloat16 task
    vectors have many such ties)."""
    if density >= 1.0:
        return tau
    return apply_trim(tau, find_trim(lambda: [tau.reshape(-1)], tau.numel(), int(density * tau.numel())))


def ties_context(chunks: Sequence[Chunks], numel: int, p: TiesParams, name: str) -> list[Trim]:
    """Each task vector's trim, found over its whole tensor, so that `ties` can run on slices."""
    dens = p.per_model("density", len(chunks), 0.2)
    return [find_trim(c, numel, int(d * numel)) if d < 1.0 else Trim(-1.0, -1) for c, d in zip(chunks, dens)]


def indicator_positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0, by arithmetic (on CPU, masks through bool tensors and
    `torch.where` cost up to 30x more than these elementwise passes)."""
    return x.sign_().clamp_(min=0)


def disjoint_merge(tvs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Sign election and disjoint weighted mean over (already sparsified) task vectors; without
    `normalize`, the agreeing weighted sum.

    Computed model by model (no stacked copy): memory is the inputs plus four tensors."""
    elected = torch.zeros_like(tvs[0])
    for w, t in zip(weights, tvs):
        elected.add_(t, alpha=w)
    gamma = elected.sign_().mul_(2).add_(1).sign_()  # +1 where the sum is >= 0, else -1
    num, den = torch.zeros_like(gamma), torch.zeros_like(gamma)
    for w, t in zip(weights, tvs):
        sign_w = math.copysign(1.0, w) if w else 0.0
        agree = indicator_positive(t.sign().mul_(gamma).mul_(sign_w))  # 1 where sign(w t) = gamma
        num.addcmul_(t, agree, value=w)
        den.add_(agree, alpha=w)
    if not normalize:
        return num
    empty = indicator_positive(den.abs().sub_(1e-8).neg_())  # |den| < 1e-8: no model agrees, divide by 1
    return num.div_(den.add_(empty.mul_(1 - den)))


@register("ties", TiesParams, context=ties_context, chunkable=True, positional=True,
          space={"weights": (0.0, 1.0), "density": (0.1, 1.0)})
def ties(base: torch.Tensor, deltas, p: TiesParams, name: str, ctx: Sequence[Trim] | None = None,
         offset: int = 0) -> torch.Tensor:
    """Trim, elect sign, disjoint mean of task vectors."""
    if ctx is None:
        ctx = ties_context([lambda t=t: [t.reshape(-1)] for t in deltas], deltas[0].numel(), p, name)
    trimmed = [apply_trim(t, c, offset) for t, c in zip(deltas, ctx)]
    return base + p.lambda_ * disjoint_merge(trimmed, p.per_model("weights", len(deltas), 1.0), p.normalize)
