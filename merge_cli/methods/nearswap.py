"""Nearswap (mergekit `nearswap`): take the other model's value where it is close to the base's.

    w = clamp(t / max(|theta0 - theta1|, 1e-6), 0, 1)      elementwise
    theta = w theta1 + (1 - w) theta0

Entries that differ by at most t are swapped in fully; larger differences are interpolated with weight
t / |difference|, so the step towards theta1 is at most t. t = 0 returns the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx


class NearswapParams(MethodParams):
    t: float = Field(
        ..., ge=0.0, description="distance below which the other model's value is taken (required)"
    )


def nearswap(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    other = tensors[0]
    w = (p.t / (base - other).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    ctx.stats["swapped_fraction"] = float((w >= 1.0).float().mean())
    return w * other + (1 - w) * base


SPEC = MethodSpec(
    name="nearswap",
    title="Nearswap (swap in the other model's values that lie near the base's)",
    paper=(
        "No paper: contributed to mergekit by Alchemonaut (2024); see Goddard et al. 2024, Arcee's MergeKit: "
        "A Toolkit for Merging Large Language Models, arXiv:2403.13257"
    ),
    params=NearswapParams,
    kernel=nearswap,
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="theta = w theta1 + (1 - w) theta0,  w = clamp(t / |theta0 - theta1|, 0, 1)",
    mergekit_defaults={},
)
