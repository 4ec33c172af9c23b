"""Nearswap (mergekit `nearswap`): take the other model's value where it is close to the base's.

    w = clamp(t / max(|theta0 - theta1|, 1e-6), 0, 1)      elementwise
    theta = w theta1 + (1 - w) theta0

Entries that differ by at most t are swapped in fully; larger differences are interpolated with weight
t / |difference|, so the step towards theta1 is at most t. t = 0 returns the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, Streamed, TensorCtx

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class NearswapParams(MethodParams):
    t: float = Field(
        ..., ge=0.0, description="distance below which the other model's value is taken (required)"
    )


def _swap(base, other, t: float, st: dict) -> torch.Tensor:
    w = (t / (base - other).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    st["swapped"] += int((w >= 1.0).sum())
    st["numel"] += base.numel()
    return w * other + (1 - w) * base


def _record(st: dict, ctx: TensorCtx) -> None:
    ctx.stats["swapped_fraction"] = st["swapped"] / max(st["numel"], 1)


def nearswap(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    st = {"swapped": 0, "numel": 0}
    out = _swap(base, tensors[0], p.t, st)
    _record(st, ctx)
    return out


SPEC = MethodSpec(
    name="nearswap",
    title="Nearswap (swap in the other model's values that lie near the base's)",
    paper=(
        "No paper: contributed to mergekit by Alchemonaut (2024); see Goddard et al. 2024, Arcee's MergeKit: "
        "A Toolkit for Merging Large Language Models, arXiv:2403.13257"
    ),
    params=NearswapParams,
    kernel=nearswap,
    streamed=Streamed(
        init=lambda p, ctx, n: {"swapped": 0, "numel": 0},
        apply=lambda st, b, xs, w, p, ctx: _swap(b, xs[0], p.t, st),
        finish=_record,
    ),
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="theta = w theta1 + (1 - w) theta0,  w = clamp(t / |theta0 - theta1|, 0, 1)",
    mergekit_defaults={},
)
