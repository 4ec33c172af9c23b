"""TSV-Merge: task singular vectors (METHODS.md §16), per 2-D tensor.

For each matrix: r = min(m, n), k = max(1, int(r / T)). Each task vector's top-k singular triplets
(fp32 SVD on the compute device) are concatenated: U = [U_1,k ... U_T,k], s, V^T stacked. U and V^T are
replaced by their polar factors (P Q^T of their SVD P S Q^T), which decorrelates the tasks' subspaces:
Delta = U_perp diag(s) V_perp^T; theta = theta0 + alpha * Delta. Any other tensor: the mean of tau_i.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from merge_cli.errors import MergeCliError
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model
from merge_cli.methods.wholemodel import gathered

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class TsvParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector before the SVD")
    alpha: float = Field(1.0, description="scale of the merged task vector")


def _svd_via_qr(x: torch.Tensor):
    """Thin SVD through a QR factorisation first (Householder QR always completes): x = Q R, R = U' S V^T,
    U = Q U'. The bidiagonal SVD then runs on the small square R (a different problem for LAPACK)."""
    if x.shape[-2] < x.shape[-1]:
        u, s, vh = _svd_via_qr(x.mT)
        return vh.mT, s, u.mT
    q, r = torch.linalg.qr(x)
    ur, s, vh = torch.linalg.svd(r, full_matrices=False)
    return q @ ur, s, vh


def svd_attempts(x: torch.Tensor, cuda: bool | None = None) -> list[tuple[str, Callable[[], tuple]]]:
    """The thin SVDs tried in order: fp32 (the spec's precision) with the default driver; on CUDA, fp32 with
    cuSOLVER's gesvd (QR iteration, slower and more robust than the Jacobi / approximate drivers); fp64
    (gesvd on CUDA); fp64 through QR first. Each later one only runs when the one before fails."""
    cuda = x.is_cuda if cuda is None else cuda
    gesvd = {"driver": "gesvd"} if cuda else {}
    tries = [("fp32", lambda: torch.linalg.svd(x, full_matrices=False))]
    if cuda:
        tries.append(("fp32 gesvd", lambda: torch.linalg.svd(x, full_matrices=False, **gesvd)))
    tries.append(("fp64", lambda: torch.linalg.svd(x.double(), full_matrices=False, **gesvd)))
    tries.append(("fp64 via QR", lambda: _svd_via_qr(x.double())))
    return tries


def _finite(result) -> bool:
    u, s, vh = result
    return bool(torch.isfinite(s).all()) and bool(torch.isfinite(u.sum() + vh.sum()))


def svd(x: torch.Tensor, stats: dict | None = None, what: str = "a matrix"):
    """Thin SVD in fp32. Where LAPACK / cuSOLVER fails to converge (an ill-conditioned matrix, e.g. a near
    rank-deficient residual; on CUDA a non-finite result counts as a failure), the next of svd_attempts runs
    and its result is cast back to fp32; `stats["svd_fallback"]` lists the attempts that were needed."""
    finite_input = None
    errors = []
    for label, attempt in svd_attempts(x):
        try:
            result = attempt()
        except (
            torch.linalg.LinAlgError,
            RuntimeError,
        ) as e:  # cuSOLVER reports some failures as RuntimeError
            errors.append(f"{label}: {str(e).splitlines()[0]}")
            continue
        if not _finite(result):
            if finite_input is None:
                finite_input = bool(torch.isfinite(x).all())
            if finite_input:  # NaN / Inf in the result of a finite matrix: did not converge
                errors.append(f"{label}: non-finite result")
                continue
        if errors and stats is not None:
            stats.setdefault("svd_fallback", []).append(label)
        return tuple(t.to(x.dtype) for t in result)
    raise MergeCliError(
        f"the SVD of {what} ({list(x.shape)}) did not converge: "
        + "; ".join(errors)
        + ". Check the inputs for NaN / Inf or near-degenerate task vectors"
    )


def polar(x: torch.Tensor, stats: dict | None = None, what: str = "a matrix") -> torch.Tensor:
    """The orthogonal polar factor P Q^T of x = P S Q^T (nearest matrix with orthonormal columns/rows)."""
    u, _, vh = svd(x, stats, what)
    return u @ vh


def _tau(base: torch.Tensor, tensors: list, i: int, w: float, consume: bool) -> torch.Tensor:
    t = tensors[i]
    if consume:  # the kernel owns the inputs (ctx.owns_inputs): reuse an fp32 input's memory
        tensors[i] = None
        if t.dtype == torch.float32 and base.dtype == torch.float32:
            return t.sub_(base).mul_(w)
    return w * (t.float() - base.float())


def task_vectors(base, tensors, weights, consume: bool = False) -> list[torch.Tensor]:
    """w_i (t_i - base) in fp32. consume (ctx.owns_inputs): computed in place in fp32 inputs, and each input
    dropped from `tensors` once used, so the inputs' memory is not held twice."""
    return [_tau(base, tensors, i, w, consume) for i, w in enumerate(weights)]


def finish(base: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + alpha * delta in base's dtype (delta, which the caller owns, is overwritten)."""
    delta = delta.to(base.dtype)
    return delta.mul_(alpha).add_(base)


def tsv(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    taus = task_vectors(base, tensors, weights, consume=ctx.owns_inputs)
    if base.dim() != 2:
        return base + p.alpha * torch.stack(taus).mean(dim=0)
    k = max(1, min(base.shape) // len(taus))
    us, ss, vhs = [], [], []
    for i in range(len(taus)):
        u, s, vh = svd(taus[i], ctx.stats, ctx.name)
        taus[i] = None  # not needed any more
        us.append(u[:, :k].clone())  # a copy: a view would keep the whole U alive
        ss.append(s[:k])
        vhs.append(vh[:k].clone())
        del u, s, vh
    U = polar(torch.cat(us, dim=1), ctx.stats, ctx.name)
    del us
    delta = U.mul_(torch.cat(ss)) @ polar(torch.cat(vhs, dim=0), ctx.stats, ctx.name)
    del U
    ctx.stats["rank_per_task"] = k
    return finish(base, delta, p.alpha)


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
