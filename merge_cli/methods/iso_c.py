"""Iso-C: isotropic merging in the common subspace (METHODS.md §17), per 2-D tensor.

M = sum_i tau_i = U diag(sigma) V^T (fp32 SVD on the compute device); Delta = U (mean(sigma) I) V^T: the
spectrum is flattened to its mean, so every direction of the summed task matrix gets the same weight
(and the nuclear norm is kept). theta = theta0 + alpha * Delta. Other tensors: the mean of tau_i.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.tsv import _tau, finish, svd, task_vectors
from merge_cli.methods.wholemodel import gathered

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class IsoCParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    alpha: float = Field(1.0, description="scale of the merged task vector (the paper tunes 1.5 for ViTs)")


def iso_c(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if base.dim() != 2:
        taus = task_vectors(base, tensors, weights, consume=ctx.owns_inputs)
        return base + p.alpha * torch.stack(taus).mean(dim=0)
    M = task_vector_sum(base, tensors, weights, consume=ctx.owns_inputs)
    u, s, vh = svd(M, ctx.stats, ctx.name)
    del M
    delta = u.mul_(s.mean()) @ vh
    del u
    return finish(base, delta, p.alpha)


def task_vector_sum(base, tensors, weights, consume: bool = False) -> torch.Tensor:
    """sum_i w_i (t_i - base) in fp32, accumulated in order, one task vector at a time (the values of
    torch.stack(task_vectors).sum(dim=0) on its vectorised path, without holding every task vector)."""
    acc = None
    for i, w in enumerate(weights):
        tau = _tau(base, tensors, i, w, consume)
        if acc is None:
            acc = tau
        else:
            acc += tau
        del tau
    return acc


SPEC = MethodSpec(
    name="iso_c",
    title="Iso-C (isotropic merging in the common subspace)",
    paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
    "Subspaces, ICML 2025, arXiv:2502.04959",
    params=IsoCParams,
    kernel=iso_c,
    needs_base=True,
    summary="per matrix: theta0 + alpha * U mean(sigma) V^T where U sigma V^T = sum_i tau_i; other tensors: mean tau",
    mergekit_defaults={},
    streamed=gathered(iso_c),
)
