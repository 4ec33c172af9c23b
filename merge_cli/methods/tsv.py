"""TSV-Merge: task singular vectors (METHODS.md §16), per 2-D tensor.

For each matrix: r = min(m, n), k = max(1, int(r / T)). Each task vector's top-k singular triplets
(fp32 SVD on the compute device) are concatenated: U = [U_1,k ... U_T,k], s, V^T stacked. U and V^T are
replaced by their polar factors (P Q^T of their SVD P S Q^T), which decorrelates the tasks' subspaces:
Delta = U_perp diag(s) V_perp^T; theta = theta0 + alpha * Delta. Any other tensor: the mean of tau_i.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.wholemodel import gathered


class TsvParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector before the SVD")
    alpha: float = Field(1.0, description="scale of the merged task vector")


def svd(x: torch.Tensor):
    """Thin SVD in fp32; where LAPACK's divide-and-conquer fails to converge (ill-conditioned, e.g. a
    near rank-deficient residual), retried in fp64 and cast back."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        return tuple(t.to(x.dtype) for t in torch.linalg.svd(x.double(), full_matrices=False))


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of x = P S Q^T (nearest matrix with orthonormal columns/rows)."""
    u, _, vh = svd(x)
    return u @ vh


def task_vectors(base, tensors, weights) -> list[torch.Tensor]:
    return [w * (t.float() - base.float()) for t, w in zip(tensors, weights, strict=True)]


def tsv(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    taus = task_vectors(base, tensors, weights)
    if base.dim() != 2:
        return base + p.alpha * torch.stack(taus).mean(dim=0)
    k = max(1, min(base.shape) // len(taus))
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    delta = (polar(torch.cat(us, dim=1)) * torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))
    ctx.stats["rank_per_task"] = k
    return base + p.alpha * delta.to(base.dtype)


SPEC = MethodSpec(
    name="tsv",
    title="TSV-Merge (task singular vectors, orthogonalised)",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, "
    "CVPR 2025, arXiv:2412.00081",
    params=TsvParams,
    kernel=tsv,
    needs_base=True,
    summary="per matrix: theta0 + alpha * polar([U_i,k]) diag([s_i,k]) polar([V_i,k]^T); other tensors: mean tau",
    mergekit_defaults={},
    streamed=gathered(tsv),
)
