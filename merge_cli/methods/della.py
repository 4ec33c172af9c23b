"""DELLA-Merging (MagPrune, elect, fuse): della and della_linear (METHODS.md §6).

Per row (2-D rows; a 1-D tensor is one row; >= 3-D reshaped to [shape[0], -1]) rank |tau| ascending
(stable sort: ties keep index order), normalise the rank to rho in [0, 1] and keep each entry with
probability q = (density - epsilon) + 2 epsilon rho. A row of length 1 gets q = density. The keep mask is
u < q with u from ctx.uniform(model index, shape), the same draws DARE uses, so epsilon = 0 is DARE with
the same seed. Survivors are divided by q (`rescale: inv_p`, the paper) or the tensor is L1-rescaled
(`l1`, mergekit). della then elects signs and takes the disjoint (weighted) mean; della_linear sums.
density >= 1 is a no-op; otherwise 0 < density - epsilon and density + epsilon < 1 are required.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from merge_cli.methods import gta
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.gta import Rescale, rescale_bool

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU (native only, every compute dtype),
# by method name: the runner, the ranks and keep probabilities (native/della.c), the merge it hands them to.
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    name: (
        "merge_cli.kernels.della.run_della",
        "merge_cli.kernels.della.keep_qs",
        "merge_cli.kernels.gta.run_gta",
        "merge_cli.kernels.native.merge",
    )
    for name in ("della", "della_linear")
}

PAPER = (
    "Deep, Bhardwaj, Poria 2024, DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, arXiv:2406.11617"
)


class DellaParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    density: float = per_model(0.7, ge=0.0, le=1.0, description="mean keep probability (1 - drop rate)")
    epsilon: float = per_model(0.07, ge=0.0, le=0.5, description="half-width of the keep-probability window")
    rescale: Rescale = Field(
        "inv_p", description="inv_p: survivors / q (paper); l1: keep ||tau||_1 (mergekit)"
    )
    normalize: bool = Field(
        True, description="disjoint weighted mean of the agreeing entries (false: their sum)"
    )
    lambda_: float = Field(1.1, alias="lambda", description="scale of the merged task vector (repo: 1.1)")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect")

    _rescale_bool = field_validator("rescale", mode="before")(rescale_bool)


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide the sum by the sum of weights")


def keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """q per entry: (density - eps) + 2 eps * normalised ascending rank of |delta| within its row."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    if n <= 1 or epsilon == 0.0:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(n, device=delta.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    rho = ranks.to(delta.dtype) / (n - 1)
    return ((density - epsilon) + 2 * epsilon * rho).reshape(delta.shape)


def della_keep(i: int, tau: torch.Tensor, p: ParamSet, ctx: TensorCtx):
    """MagPrune's keep mask of model i: u < q, q from the magnitude rank within each row."""
    d, e = p.density[i], p.epsilon[i]
    if d >= 1.0 or tau.numel() == 0:
        return None, None
    q = keep_probability(tau, d, e)
    return ctx.uniform(i, tau.shape) < q, q


def _check(p: ParamSet, n: int) -> str | None:
    for i, (d, e) in enumerate(zip(p.density, p.epsilon, strict=True)):
        if d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
            return (
                f"model {i + 1}: density {d} +/- epsilon {e} must stay inside (0, 1); "
                "lower epsilon or move density away from 0 and 1"
            )
    return None


_MK = {"density": 1.0, "epsilon": 0.15, "rescale": "l1", "lambda": 1.0}

DELLA = MethodSpec(
    name="della",
    title="DELLA (magnitude-ranked random drop, rescale, elect sign, disjoint mean)",
    paper=PAPER,
    params=DellaParams,
    kernel=gta.kernel(della_keep, True),
    streamed=gta.stream(della_keep, True, passes=1),
    needs_base=True,
    random=True,
    check=_check,
    summary="theta = theta0 + lambda * disjoint_mean(elect(m_i * tau_i / q_i)),  q = d - eps + 2 eps rank(|tau|)",
    mergekit_defaults=_MK,
)

DELLA_LINEAR = MethodSpec(
    name="della_linear",
    title="DELLA without sign election (magnitude-ranked random drop, rescale, sum)",
    paper=PAPER,
    params=DellaLinearParams,
    kernel=gta.kernel(della_keep, False),
    streamed=gta.stream(della_keep, False, passes=1),
    needs_base=True,
    random=True,
    check=_check,
    summary="theta = theta0 + lambda * sum_i w_i m_i * tau_i / q_i,  q = d - eps + 2 eps rank(|tau|)",
    mergekit_defaults=_MK,
)
