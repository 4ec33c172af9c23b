"""Model Breadcrumbs: breadcrumbs and breadcrumbs_ties (METHODS.md §5).

Each task vector keeps a band of magnitudes: the top `gamma` fraction (outliers) is removed and, below it,
the next int(density * n) largest entries are kept, where n is the row length (`granularity: row`, the
reference repo: rows along the last dim; 0-dim tensors untouched) or the tensor size (`granularity:
tensor`, mergekit). The kept count is exactly int(density * n); if density + gamma > 1 fewer outliers are
removed (as mergekit does). Ties are broken by lowest index (selection.py), so the result is deterministic.
Unlike mergekit, gamma * n rounding to 0 removes nothing (mergekit's `[n_bot:-0]` slice zeroes the tensor).

Naming: the reference repo calls the kept fraction `top_k_keep` (beta) and the removed top `top_k_remove`
(gamma); mergekit calls them `density` and `gamma`. We use mergekit's names. The reference scales the sum by
alpha (tuned on 8 vision tasks, start 0.2); our `lambda` defaults to 1 as in task_arithmetic here.
breadcrumbs = sum of the sparse task vectors; breadcrumbs_ties adds TIES sign consensus (a sum of agreeing
entries unless `normalize`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.gta import combine
from merge_cli.methods.selection import topk_mask_2d

PAPER = (
    "Davari, Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
    "ECCV 2024, arXiv:2312.06795"
)


class BreadcrumbsParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    density: float = per_model(0.15, ge=0.0, le=1.0, description="fraction kept (reference top_k_keep, beta)")
    gamma: float = per_model(
        0.006, ge=0.0, le=1.0, description="largest-magnitude fraction removed first (reference top_k_remove)"
    )
    granularity: Literal["row", "tensor"] = Field(
        "row", description="row: per row along the last dim (reference); tensor: mergekit"
    )
    normalize: bool = Field(
        False, description="divide by the sum of weights (of agreeing models with consensus)"
    )
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect")


def band_mask(scores: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per row of a 2-D `scores`: the int(density*n) largest entries below the int(gamma*n) largest."""
    n = scores.shape[1]
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    return topk_mask_2d(scores, n_keep + n_top) & ~topk_mask_2d(scores, n_top)


def breadcrumbs_sparsify(delta: torch.Tensor, density: float, gamma: float, granularity: str) -> torch.Tensor:
    if density >= 1.0 or delta.numel() == 0:
        return delta
    if granularity == "row":
        if delta.dim() == 0:
            return delta
        scores = delta.abs().reshape(-1, delta.shape[-1])
    else:
        scores = delta.abs().reshape(1, -1)
    return delta * band_mask(scores, density, gamma).reshape(delta.shape)


def _kernel(consensus: bool):
    def kernel(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
        sparse = torch.stack(
            [
                breadcrumbs_sparsify(t - base, d, g, p.granularity)
                for t, d, g in zip(tensors, p.density, p.gamma, strict=True)
            ]
        )
        return combine(
            base, sparse, weights, consensus=consensus, normalize=p.normalize, lambda_=p.lambda_, ctx=ctx
        )

    return kernel


_MK = {"density": 1.0, "gamma": 0.01, "granularity": "tensor"}

BREADCRUMBS = MethodSpec(
    name="breadcrumbs",
    title="Model Breadcrumbs (drop outliers and small entries, sum)",
    paper=PAPER,
    params=BreadcrumbsParams,
    kernel=_kernel(False),
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i band_i(tau_i),  band = top (density+gamma) minus top gamma by |tau|",
    mergekit_defaults=_MK,
)

BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties",
    title="Model Breadcrumbs with TIES sign consensus",
    paper=PAPER,
    params=BreadcrumbsParams,
    kernel=_kernel(True),
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i band_i(tau_i) [sign(band_i) = elected sign]",
    mergekit_defaults=_MK,
)
