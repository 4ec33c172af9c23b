"""Task arithmetic: theta0 + lambda * sum_i w_i tau_i (METHODS.md §2)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model


class TaskArithmeticParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vector")
    normalize: bool = Field(False, description="divide the sum by the sum of weights")


def task_arithmetic(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    delta = torch.zeros_like(base)
    for w, t in zip(weights, tensors):
        delta.add_(t - base, alpha=w)
    if p.normalize:
        s = sum(weights)
        delta.div_(s if abs(s) >= 1e-8 else 1.0)
    return base + p.lambda_ * delta


SPEC = MethodSpec(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, ICLR 2023, arXiv:2212.04089",
    params=TaskArithmeticParams,
    kernel=task_arithmetic,
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i (theta_i - theta0)",
    mergekit_defaults={},
    elementwise=True,
)
