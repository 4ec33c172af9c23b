"""Iso-C: isotropic merging in the common subspace (METHODS.md §17), per 2-D tensor.

M = sum_i tau_i = U diag(sigma) V^T (fp32 SVD on the compute device); Delta = U (mean(sigma) I) V^T: the
spectrum is flattened to its mean, so every direction of the summed task matrix gets the same weight
(and the nuclear norm is kept). theta = theta0 + alpha * Delta. Other tensors: the mean of tau_i.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.tsv import svd, task_vectors
from merge_cli.methods.wholemodel import gathered


class IsoCParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    alpha: float = Field(1.0, description="scale of the merged task vector (the paper tunes 1.5 for ViTs)")


def iso_c(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    taus = task_vectors(base, tensors, weights)
    if base.dim() != 2:
        return base + p.alpha * torch.stack(taus).mean(dim=0)
    u, s, vh = svd(torch.stack(taus).sum(dim=0))
    return base + p.alpha * ((u * s.mean()) @ vh).to(base.dtype)


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
