"""Linear average: model soups, checkpoint averaging (METHODS.md §1)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model


class LinearParams(MethodParams):
    weight: float = per_model(1.0, description="weight of this model in the average")
    normalize: bool = Field(True, description="divide by the sum of weights (a weighted mean)")


def _check(p: ParamSet, n: int) -> str | None:
    if p.normalize and abs(sum(p.weight)) < 1e-12:
        return "weights sum to 0 with normalize: true; give non-zero weights or set normalize: false"
    return None


def linear(base, tensors: list[torch.Tensor], weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    # the same operations, in the same order, as the fused kernel (merge_cli/fused.py), so both agree bitwise
    out = tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:]):
        out = out + t * w
    if p.normalize:
        out.div_(float(sum(weights)))
    return out


SPEC = MethodSpec(
    name="linear",
    title="Linear average (model soups)",
    paper="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models, arXiv:2203.05482",
    params=LinearParams,
    kernel=linear,
    needs_base=False,
    summary="theta = sum_i w_i theta_i / sum_i w_i (no base needed)",
    check=_check,
    mergekit_defaults={},
    elementwise=True,
)
