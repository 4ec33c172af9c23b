"""Arcee Fusion (mergekit `arcee_fusion`): take the other model's update only where it matters most.

    d = theta1 - theta0
    KL_row = sum_j softmax(theta1)_j (log softmax(theta1)_j - log softmax(theta0)_j)   (over the last dim)
    importance = |d| * KL_row                        (each entry times the KL of its row)
    threshold = median(importance) + 1.5 IQR(importance)
    theta = theta0 + [importance >= threshold] * d

The median and quartiles are exact, over the whole tensor (kthvalue order statistics with linear
interpolation, as torch.quantile), with no sampling; mergekit estimates them from a sample of at most
1M entries, so results can differ slightly on tensors larger than that.
"""

from __future__ import annotations

import math

import torch

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx


class ArceeFusionParams(MethodParams):
    pass


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Exact q-quantile of all entries (linear interpolation between order statistics), any size."""
    flat = x.reshape(-1)
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a = torch.kthvalue(flat, lo + 1).values
    if hi == lo:
        return a
    b = torch.kthvalue(flat, hi + 1).values
    return a + (b - a) * (pos - lo)


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if base.dim() == 0:
        return torch.zeros_like(base)
    logp = torch.log_softmax(other, dim=-1)
    logq = torch.log_softmax(base, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def arcee_fusion(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    other = tensors[0]
    imp = importance(base, other)
    thr = quantile(imp, 0.5) + 1.5 * (quantile(imp, 0.75) - quantile(imp, 0.25))
    mask = imp >= thr
    ctx.stats["kept_fraction"] = [float(mask.float().mean())]
    return base + mask * (other - base)


SPEC = MethodSpec(
    name="arcee_fusion",
    title="Arcee Fusion (keep the updates whose KL-weighted importance is an outlier)",
    paper=(
        "No paper: Arcee AI 2025, introduced with mergekit; see Goddard et al. 2024, Arcee's MergeKit: "
        "A Toolkit for Merging Large Language Models, arXiv:2403.13257"
    ),
    params=ArceeFusionParams,
    kernel=arcee_fusion,
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="theta = theta0 + [imp >= median + 1.5 IQR] (theta1 - theta0),  imp = |theta1 - theta0| KL_row",
    mergekit_defaults={},
)
