"""DARE (drop and rescale): dare_linear and dare_ties (METHODS.md §4), per tensor.

Each task vector keeps each entry independently with probability `density` (= 1 - drop rate p). The keep
mask is `u < density` with u drawn by ctx.uniform(model index, shape): seeded by (recipe seed, tensor name,
model index) and drawn on the CPU, so it is bitwise the same on every device and in every tensor order.
Survivors are rescaled by 1/density (`rescale: inv_p`, the paper) or by the L1-norm ratio (`l1`, mergekit).

dare_linear = task arithmetic on the rescaled task vectors.
dare_ties: native defaults follow the paper's code (MergeLM): full TIES on the rescaled task vectors, i.e.
a magnitude trim to `trim_density` (MergeLM's mask rate 0.8 -> keep 0.2), sign election, disjoint mean.
mergekit's dare_ties is `trim_density: 1` (no trim), `normalize: false` (a sum of the agreeing weighted
deltas) and `rescale: l1`; mergekit-format recipes get exactly that through `mergekit_defaults`.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from merge_cli.methods import gta
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.gta import Rescale, rescale_bool

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU, by method name: the blocked
# runner, then the primitives it calls (native C, with the eager blocked form as the fallback).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "dare_linear": (
        "merge_cli.kernels.gta.run_gta",
        "merge_cli.kernels.gta.gta_sparsify",
        "merge_cli.kernels.native.merge",
        "merge_cli.kernels.blocked.sparse_sum",
    ),
    "dare_ties": (
        "merge_cli.kernels.gta.run_gta",
        "merge_cli.kernels.gta.gta_sparsify",
        "merge_cli.kernels.native.merge",
        "merge_cli.kernels.blocked.consensus",
    ),
}

PAPER = (
    "Yu, Yu, Yu, Huang, Li 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
    "as a Free Lunch, ICML 2024, arXiv:2311.03099"
)


class DareLinearParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    density: float = per_model(
        0.1, ge=0.0, le=1.0, description="keep probability of each entry (1 - drop rate; the paper drops 90%)"
    )
    rescale: Rescale = Field(
        "inv_p", description="inv_p: survivors / density (paper); l1: keep ||tau||_1 (mergekit)"
    )
    normalize: bool = Field(False, description="divide the sum by the sum of weights")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect")

    _rescale_bool = field_validator("rescale", mode="before")(rescale_bool)


class DareTiesParams(DareLinearParams):
    normalize: bool = Field(True, description="disjoint mean of the agreeing entries (false: their sum)")
    trim_density: float = Field(
        0.2, ge=0.0, le=1.0, description="TIES magnitude trim after DARE (MergeLM); 1 = no trim (mergekit)"
    )


def dare_keep(i: int, tau: torch.Tensor, p: ParamSet, ctx: TensorCtx):
    """The DARE keep mask of model i: u < density with u from ctx.uniform (seeded, offset-aware)."""
    d = p.density[i]
    if d >= 1.0:
        return None, None
    if d <= 0.0:
        return torch.zeros_like(tau, dtype=torch.bool), 0.0
    return ctx.uniform(i, tau.shape) < d, float(d)


_MK = {"density": 1.0, "rescale": "l1", "normalize": False}

DARE_LINEAR = MethodSpec(
    name="dare_linear",
    title="DARE + task arithmetic (random drop, rescale, sum)",
    paper=PAPER,
    params=DareLinearParams,
    kernel=gta.kernel(dare_keep, False),
    streamed=gta.stream(dare_keep, False, passes=1),
    needs_base=True,
    random=True,
    summary="theta = theta0 + lambda * sum_i w_i (m_i * tau_i) / density,  m_i ~ Bernoulli(density)",
    mergekit_defaults=_MK,
)

DARE_TIES = MethodSpec(
    name="dare_ties",
    title="DARE + TIES (random drop, rescale, trim, elect sign, disjoint merge)",
    paper=PAPER,
    params=DareTiesParams,
    kernel=gta.kernel(dare_keep, True),
    streamed=gta.stream(dare_keep, True, passes=3),
    needs_base=True,
    random=True,
    summary="theta = theta0 + lambda * disjoint_merge(elect(trim(m_i * tau_i / density, trim_density)))",
    mergekit_defaults={**_MK, "trim_density": 1.0},
)
