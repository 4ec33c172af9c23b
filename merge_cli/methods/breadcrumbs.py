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

`numerics: mergekit` (opt-in, also for mergekit-format recipes; granularity tensor) cuts the band from
torch's ascending sort of |tau| in fp32, as mergekit 0.1.5 does, so magnitudes tied at either edge fall as
the sort orders them (row-chunked tensors: lowest index): mergekit's bits at mergekit's price (a full
sort per tensor and model); the default's exact selection differs only at tied magnitudes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods import gta
from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    TensorCtx,
    mergekit_numerics,
    numerics_param,
    per_model,
)

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
    numerics: Numerics = numerics_param(
        "band edges' ties broken by lowest index",
        "granularity tensor: the band cut from torch's ascending sort of |tau|, ties as torch's sort orders"
        " them, as mergekit 0.1.5, to match its output bits at tied magnitudes; costs a full sort per tensor"
        " and model (row-chunked tensors: lowest index)",
        mergekit_default=False,
    )


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries kept + removed outliers, removed outliers) for a row or tensor of n entries."""
    n_keep = int(density * n)
    n_top = min(int(gamma * n), n - n_keep)
    return n_keep + n_top, n_top


def breadcrumbs_keep(i: int, tau: torch.Tensor, p: ParamSet, ctx: TensorCtx):
    """The band mask of model i, per row along the last dim or over the whole tensor."""
    d, g = p.density[i], p.gamma[i]
    if d >= 1.0 or tau.numel() == 0 or (p.granularity == "row" and tau.dim() == 0):
        return None, None
    if p.granularity == "tensor" and mergekit_numerics(p):
        return sorted_band(tau, d, g), None
    scores = tau.abs().reshape(-1, tau.shape[-1]) if p.granularity == "row" else tau.abs().reshape(1, -1)
    return gta.band_mask(scores, *band_counts(scores.shape[1], d, g)).reshape(tau.shape), None


def sorted_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's band (numerics: mergekit): in torch.sort's ascending order of the fp32 magnitudes, skip the
    n - k_hi smallest and keep the next int(density * n); ties at either edge fall as the sort orders them."""
    n = tau.numel()
    k_hi, _ = band_counts(n, density, gamma)
    order = torch.sort(tau.abs().reshape(-1).float()).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[n - k_hi : n - k_hi + int(density * n)]] = True
    return mask.reshape(tau.shape)


def breadcrumbs_band(i: int, p: ParamSet, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """When streamed in row chunks: the tensor-level band counts (granularity tensor, or a 1-D tensor)."""
    if p.density[i] >= 1.0 or (p.granularity == "row" and len(shape) > 1):
        return None
    return band_counts(math.prod(shape), p.density[i], p.gamma[i])


# not numerics: mergekit (torch's sort order at ties): it costs mergekit's full sort; opt-in
_MK = {"density": 1.0, "gamma": 0.01, "granularity": "tensor"}

BREADCRUMBS = MethodSpec(
    name="breadcrumbs",
    title="Model Breadcrumbs (drop outliers and small entries, sum)",
    paper=PAPER,
    params=BreadcrumbsParams,
    kernel=gta.kernel(breadcrumbs_keep, False),
    streamed=gta.stream(breadcrumbs_keep, False, passes=2, band=breadcrumbs_band),
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i band_i(tau_i),  band = top (density+gamma) minus top gamma by |tau|",
    mergekit_defaults=_MK,
)

BREADCRUMBS_TIES = MethodSpec(
    name="breadcrumbs_ties",
    title="Model Breadcrumbs with TIES sign consensus",
    paper=PAPER,
    params=BreadcrumbsParams,
    kernel=gta.kernel(breadcrumbs_keep, True),
    streamed=gta.stream(breadcrumbs_keep, True, passes=2, band=breadcrumbs_band),
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i band_i(tau_i) [sign(band_i) = elected sign]",
    mergekit_defaults=_MK,
)

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU, by method name: the blocked
# runner, then the primitives it calls (native C, with the eager blocked form as the fallback).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "breadcrumbs": (
        "merge_cli.kernels.gta.run_gta",
        "merge_cli.kernels.gta.gta_sparsify",
        "merge_cli.kernels.native.merge",
        "merge_cli.kernels.blocked.sparse_sum",
    ),
    "breadcrumbs_ties": (
        "merge_cli.kernels.gta.run_gta",
        "merge_cli.kernels.gta.gta_sparsify",
        "merge_cli.kernels.native.merge",
        "merge_cli.kernels.blocked.consensus",
    ),
}
