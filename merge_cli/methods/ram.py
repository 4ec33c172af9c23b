"""RAM and RAM+ (Reinforced Agent Merging; MERGEKIT.md §3), per tensor, elementwise.

An entry of tau_i is active when |tau_i| > epsilon. Per element:
    no model active       -> theta0
    exactly one active    -> theta0 + tau_i            (a unique update is kept, not diluted)
    several active        -> theta0 + mean of the active tau_i   (shared updates are averaged)
ramplus_tl (RAM+, tensor level) scales model i's unique updates by 1 + r * clip(s_i / u_i, 0, alpha), where
s_i and u_i count model i's shared and unique active entries in this tensor (u_i = 0: no unique entries).
Per-model weights are not used.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx

PAPER = (
    "Yuan, Shi, Zhang, Liu, Yao, Vosoughi, Lee 2026, Behavior Knowledge Merge in Reinforced Agentic Models, "
    "arXiv:2601.13572"
)


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="|tau| above this counts as an update (active entry)")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0.0, description="strength of the rescale of unique updates")
    alpha: float = Field(0.2, ge=0.0, description="cap on the shared/unique ratio")


def ram_merge(
    base: torch.Tensor, tensors: list[torch.Tensor], eps: float, r: float, alpha: float, ctx: TensorCtx
):
    deltas = torch.stack([t - base for t in tensors])
    active = deltas.abs() > eps
    count = active.sum(dim=0)
    unique = active & (count == 1).unsqueeze(0)
    shared = active & (count > 1).unsqueeze(0)
    n = deltas.shape[0]
    scales = []
    for i in range(n):
        u = int(unique[i].sum())
        s = int(shared[i].sum())
        scales.append(1.0 + r * min(max(s / u, 0.0), alpha) if u > 0 else 1.0)
    sc = torch.tensor(scales, dtype=deltas.dtype, device=deltas.device).reshape(-1, *([1] * base.dim()))
    uniq = (deltas * unique * sc).sum(dim=0)
    shar = (deltas * shared).sum(dim=0) / count.clamp_min(1).to(deltas.dtype)
    ctx.stats["kept_fraction"] = [float(x) for x in active.reshape(n, -1).float().mean(dim=1)]
    ctx.stats["shared_fraction"] = float((count > 1).float().mean())
    if r:
        ctx.stats["unique_scale"] = scales
    return base + torch.where(count > 1, shar, uniq)


def ram(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    return ram_merge(base, tensors, p.epsilon, 0.0, 0.0, ctx)


def ramplus_tl(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    return ram_merge(base, tensors, p.epsilon, p.r, p.alpha, ctx)


RAM = MethodSpec(
    name="ram",
    title="RAM (keep unique updates, average shared ones)",
    paper=PAPER,
    params=RamParams,
    kernel=ram,
    needs_base=True,
    summary="theta = theta0 + (tau_i where only model i changed; mean of the changed tau_i where several did)",
    mergekit_defaults={},
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    title="RAM+ (RAM with unique updates rescaled by the shared/unique ratio, per tensor)",
    paper=PAPER,
    params=RamPlusParams,
    kernel=ramplus_tl,
    needs_base=True,
    summary="RAM with unique tau_i scaled by 1 + r * clip(shared_i / unique_i, 0, alpha)",
    mergekit_defaults={},
)
