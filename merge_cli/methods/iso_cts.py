"""Iso-CTS: isotropic merging with common and task-specific subspaces (METHODS.md §17), per 2-D tensor.

M = sum_i tau_i; r = min(m, n). The common space is M's top kc singular directions, kc = r - T * ks with
ks = (r - int(frac * r)) // T (so T divides r - kc). Each task contributes the top ks directions of its
residual tau_i - Uc Uc^T tau_i. The concatenated U and V^T are orthogonalised by their polar factors and
every singular value is set to the mean of the kept ones (common and task-specific):
Delta = s_mean * polar(U) polar(V^T); theta = theta0 + alpha * Delta. Other tensors: the mean of tau_i.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.tsv import finish, polar, svd, task_vectors
from merge_cli.methods.wholemodel import gathered

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class IsoCtsParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    alpha: float = Field(1.0, description="scale of the merged task vector (the paper tunes 1.5 for ViTs)")
    common_space_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="share of the rank kept from sum_i tau_i"
    )


def space_sizes(r: int, n_tasks: int, frac: float) -> tuple[int, int]:
    """(kc, ks): common directions and directions per task, kc + n_tasks * ks = r."""
    ks = (r - int(frac * r)) // n_tasks
    return r - n_tasks * ks, ks


def iso_cts(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    taus = task_vectors(base, tensors, weights, consume=ctx.owns_inputs)
    if base.dim() != 2:
        return base + p.alpha * torch.stack(taus).mean(dim=0)
    M = taus[0].clone()
    for tau in taus[1:]:  # in order: torch.stack(taus).sum(dim=0)'s values (vectorised path)
        M += tau
    u, s, vh = svd(M, ctx.stats, ctx.name)
    del M
    kc, ks = space_sizes(min(base.shape), len(taus), p.common_space_fraction)
    uc = u[:, :kc]
    del u
    us, ss, vhs = [uc], [s[:kc]], [vh[:kc]]
    for i in range(len(taus) if ks > 0 else 0):
        tau = taus[i]
        taus[i] = None  # not needed after its residual
        residual = tau - uc @ (uc.T @ tau)
        del tau
        ui, si, vhi = svd(residual, ctx.stats, ctx.name)
        del residual
        us.append(ui[:, :ks].clone())  # a copy: a view would keep the whole U alive
        ss.append(si[:ks])
        vhs.append(vhi[:ks].clone())
        del ui, vhi
    del taus, uc
    sigma = torch.cat(ss).mean()
    ctx.stats["common_directions"] = kc
    U = polar(torch.cat(us, dim=1), ctx.stats, ctx.name)
    del us
    delta = U.mul_(sigma) @ polar(torch.cat(vhs, dim=0), ctx.stats, ctx.name)
    del U
    return finish(base, delta, p.alpha)


SPEC = MethodSpec(
    name="iso_cts",
    title="Iso-CTS (isotropic merging, common + task-specific subspaces)",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025, arXiv:2502.04959",
    params=IsoCtsParams,
    kernel=iso_cts,
    needs_base=True,
    summary="per matrix: theta0 + alpha * mean(s) polar([Uc, U_i,ks]) polar([Vc, V_i,ks]^T); other tensors: mean tau",
    mergekit_defaults={},
    streamed=gathered(iso_cts),
)
