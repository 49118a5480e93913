"""Linear merge (model soup; Wortsman et al. 2022, "Model soups").

    theta = sum_i w_i theta_i / sum_i w_i  =  base + sum_i w_i tau_i / sum_i w_i

Weights default to equal; they are normalized to sum 1 (mergekit's `normalize: true`).
"""
from __future__ import annotations

import torch

from .registry import MethodParams, register, weighted_sum


class LinearParams(MethodParams):
    pass


def _coefficients(p: LinearParams, deltas) -> list[float]:
    w = p.per_model("weights", len(deltas), 1.0)
    total = sum(w)
    if abs(total) < 1e-12:
        raise ValueError("params.weights sum to zero; linear merge normalizes by their sum")
    return [x / total for x in w]


@register("linear", LinearParams, chunkable=True, coefficients=_coefficients, space={"weights": (0.0, 1.0)})
def linear(base: torch.Tensor, deltas, p: LinearParams, name: str) -> torch.Tensor:
    """Weighted average of the models."""
    return base + weighted_sum(deltas, _coefficients(p, deltas))
