"""TIES-Merging: trim, elect sign, disjoint merge (METHODS.md §3), per tensor.

Trim keeps exactly int(density * numel) entries of each task vector by magnitude (ties at the threshold
broken by lowest index). The sign is elected on the unweighted sum of trimmed task vectors (the paper),
unless `weighted_election` is set (mergekit elects on the weighted sum). Coordinates whose sum is exactly
0 take the tensor's majority sign. The disjoint merge is a weighted mean (`merge_func: mean`), sum or max
over the entries that agree with the elected sign.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods import ties_model
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.selection import topk_mask


class TiesParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's trimmed task vector")
    density: float = per_model(
        0.2, ge=0.0, le=1.0, description="fraction of each task vector kept by magnitude"
    )
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    merge_func: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max")
    weighted_election: bool = Field(False, description="elect signs on weighted task vectors (mergekit)")
    granularity: Literal["tensor", "model"] = Field(
        "tensor",
        description="trim per tensor (exactly k) or over the whole model (reference; streamed passes)",
    )
    topk: Literal["exact", "threshold"] = Field(
        "exact",
        description="granularity model: exactly int(d*k) kept (ties by index) or all |tau| >= the reference kth",
    )


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    return delta * topk_mask(delta.abs(), k)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """+1/-1 per coordinate: sign of the sum over models; exact zeros take the tensor's majority sign."""
    gamma = torch.sign(stacked.sum(dim=0))
    majority = 1.0 if float(gamma.sum()) >= 0 else -1.0
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


def disjoint_merge(
    trimmed: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor, how: str
) -> torch.Tensor:
    """Merge the entries whose sign agrees with gamma. trimmed: [N, ...], weights: [N] (broadcast)."""
    agree = (torch.sign(trimmed) == gamma.unsqueeze(0)).to(trimmed.dtype)
    w = weights.reshape(-1, *([1] * (trimmed.dim() - 1)))
    contrib = trimmed * w * agree
    if how == "sum":
        return contrib.sum(dim=0)
    if how == "max":
        idx = contrib.abs().argmax(dim=0, keepdim=True)
        return contrib.gather(0, idx).squeeze(0)
    denom = (w * agree).sum(dim=0)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    return contrib.sum(dim=0) / denom


def ties(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if p.granularity == "model":  # whole-model trim from the statistics passes (ties_model.py)
        return ties_model.ties_whole_model(base, tensors, weights, p, ctx)
    trimmed = torch.stack([trim(t - base, d) for t, d in zip(tensors, p.density)])
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device)
    elect_on = trimmed * w.reshape(-1, *([1] * (trimmed.dim() - 1))) if p.weighted_election else trimmed
    gamma = elect_sign(elect_on)
    merged = disjoint_merge(trimmed, w, gamma, p.merge_func)
    nz = trimmed != 0
    signs = torch.sign(trimmed)
    touched = nz.any(dim=0)
    conflict = ((signs > 0).any(dim=0) & (signs < 0).any(dim=0)).sum()
    ctx.stats["kept_fraction"] = [float(x) for x in nz.reshape(len(tensors), -1).float().mean(dim=1)]
    ctx.stats["sign_conflict_rate"] = float(conflict) / max(int(touched.sum()), 1)
    return base + p.lambda_ * merged


SPEC = MethodSpec(
    name="ties",
    title="TIES-Merging (trim, elect sign, disjoint merge)",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708",
    params=TiesParams,
    kernel=ties,
    needs_base=True,
    summary="theta = theta0 + lambda * disjoint_merge(elect(trim(tau_i, density)))",
    mergekit_defaults={"density": 1.0, "weighted_election": True},
    stats=ties_model.TiesModelStats,
    plan_check=ties_model.plan_check,
)
