"""SCE: Select, Calculate, Erase (FuseChat; METHODS.md §11, MERGEKIT.md §3), per tensor.

    T = stack(tau_i)
    Select (select_topk < 1): v = population variance over models per element; keep in every model only
        the k = int(count_nonzero(v) * select_topk) highest-variance positions (exact top-k, lowest index on ties)
    Calculate: w_i = mean(tau^_i^2) / sum_j mean(tau^_j^2)   (uniform when that sum is < 1e-6)
    Erase: elect the sign of sum_i tau^_i (TIES; a zero sum counts as +), M_i = [sign(tau^_i) = gamma]
    theta = theta0 + sum_i w_i M_i tau^_i / max(sum_i w_i M_i, 1e-6)

Per-model `weight`s are accepted and not used (as in mergekit). With select_topk < 1 and identical models v = 0, k = 0
and the result is the base (documented behaviour of the method, kept).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.selection import topk_mask
from merge_cli.methods.ties import disjoint_merge, elect_sign


class SceParams(MethodParams):
    weight: float = per_model(1.0, description="accepted for mergekit recipes; SCE computes its own weights")
    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of the non-zero-variance positions kept (1 = select nothing out)",
    )
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect")


def sce(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    stacked = torch.stack([t - base for t in tensors])
    n = stacked.shape[0]
    if p.select_topk < 1.0:
        var = stacked.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * p.select_topk)
        stacked = stacked * topk_mask(var, k).unsqueeze(0)
    energy = stacked.reshape(n, -1).pow(2).mean(dim=1)
    total = float(energy.sum())
    w = energy / total if total >= 1e-6 else torch.full_like(energy, 1.0 / n)
    positive = elect_sign(stacked) > 0
    num = disjoint_merge(list(stacked), [float(x) for x in w], positive, "sum")
    agree = torch.where(positive, stacked > 0, stacked < 0).to(stacked.dtype)
    den = (w.reshape(-1, *([1] * (stacked.dim() - 1))) * agree).sum(dim=0).clamp_min(1e-6)
    ctx.stats["weights"] = [float(x) for x in w]
    ctx.stats["kept_fraction"] = [float(x) for x in (stacked != 0).reshape(n, -1).float().mean(dim=1)]
    return base + num / den


SPEC = MethodSpec(
    name="sce",
    title="SCE (select high-variance positions, weight by energy, erase sign conflicts)",
    paper="Wan, Zhong, Yang, Chen, Quan 2024, FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990",
    params=SceParams,
    kernel=sce,
    needs_base=True,
    summary="theta = theta0 + sum_i w_i M_i tau^_i / sum_i w_i M_i,  w_i ~ mean(tau^_i^2),  tau^ = top-variance positions",
    mergekit_defaults={},
)
