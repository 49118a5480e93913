"""Task arithmetic (Ilharco et al., ICLR 2023, "Editing models with task arithmetic").

    theta = base + lambda * sum_i w_i tau_i,    tau_i = theta_i - base

Weights default to 1 each, lambda to 1 (as mergekit: no normalization).
"""
from __future__ import annotations

import torch
from pydantic import Field

from .registry import MethodParams, register, weighted_sum


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vectors")


def _coefficients(p: TaskArithmeticParams, deltas) -> list[float]:
    return [p.lambda_ * w for w in p.per_model("weights", len(deltas), 1.0)]


@register("task_arithmetic", TaskArithmeticParams, chunkable=True, coefficients=_coefficients,
          space={"weights": (0.0, 1.0)}, sums=True)
def task_arithmetic(base: torch.Tensor, deltas, p: TaskArithmeticParams, name: str) -> torch.Tensor:
    """base + lambda * weighted sum of task vectors."""
    return base + p.lambda_ * weighted_sum(deltas, p.per_model("weights", len(deltas), 1.0))
