"""Karcher (Riemannian) mean on the sphere of directions, scaled by the mean norm (METHODS.md §10).

Per tensor, flattened: n_i = |theta_i|, u_i = theta_i / n_i; inputs with n_i <= tol are dropped from the
direction (weights renormalised over the rest). u starts at normalise(sum a_i u_i) (u_1 if that is ~0) and
iterates, at most max_iter times:
    c_i = clamp(<u, u_i>, -1, 1),  phi_i = arccos(c_i)    (phi_i < tol is skipped)
    T = sum_i a_i phi_i / sin(phi_i) (u_i - c_i u)          (log map; sin clamped >= 1e-6 near antipodes)
    stop if |T| < tol, else u <- cos|T| u + sin|T| T/|T|   (exp map), renormalised
Output (sum_i a_i n_i) u with the original weights (zero-norm inputs included).

Every iterate lies in the span of the u_i, so we iterate on its coefficients (u = sum_i b_i u_i) using the
float64 Gram matrix of the inputs: exact, K-dimensional, and one pass over the tensor (huge tensors are
merged in row chunks after one pass that sums the Gram matrix). Weights a_i are the per-model `weight`s
normalised to sum 1 (mergekit: equal weights, the default).

`numerics: mergekit` (the default of mergekit-format recipes) runs the iteration above the way mergekit
0.1.5 does, on the full tensors in the compute dtype (fp32, or bf16 with `dtype: bfloat16`): unit vectors
rounded to that dtype, torch.dot products, arccos/sin of 0-dim tensors, the tangent and the exp map
rounded at every step, norms in fp32, no clamp of sin near antipodes, output (sum_i a_i n_i) * u. Its
iterates (and so where the tol test stops them) then carry mergekit's rounding. Tensors merged in row
chunks (too large to merge whole) use the exact coefficient-space iteration either way.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    Streamed,
    TensorCtx,
    numerics_param,
    per_model,
)
from merge_cli.methods.model_stock import gram


class KarcherParams(MethodParams):
    weight: float = per_model(1.0, ge=0.0, description="relative weight of this model (normalised to sum 1)")
    max_iter: int = Field(10, ge=1, description="maximum Riemannian gradient steps")
    tol: float = Field(1e-5, gt=0.0, description="convergence tolerance and zero-norm threshold")
    numerics: Numerics = numerics_param(
        "iterate on coefficients from the float64 Gram matrix",
        "iterate on the full tensors in the compute dtype as mergekit 0.1.5 does, to match its output bits"
        " (row-chunked tensors: exact)",
    )


def _check(p: ParamSet, n: int) -> str | None:
    if sum(p.weight) <= 0:
        return "the weights sum to 0; give at least one model a positive weight"
    return None


def flat_gram(xs: list[torch.Tensor]) -> torch.Tensor:
    return gram([x.reshape(1, -1) for x in xs])[:, :, 0]


def karcher_coefficients(
    g: torch.Tensor, weights: list[float], max_iter: int, tol: float
) -> tuple[list[float], int]:
    """From the Gram matrix of the inputs: c_i with output = sum_i c_i theta_i, and the steps taken."""
    total = sum(weights)
    a = [w / total for w in weights]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(len(a))]
    scale = sum(ai * ni for ai, ni in zip(a, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > tol and a[i] > 0]
    if not valid:
        return [0.0] * len(a), 0
    nv = torch.tensor([norms[i] for i in valid], dtype=torch.float64)
    gu = g[valid][:, valid].cpu() / torch.outer(nv, nv)  # Gram matrix of the unit vectors
    av = torch.tensor([a[i] for i in valid], dtype=torch.float64)
    av = av / av.sum()

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ gu @ c), 0.0))

    b = av.clone()
    nb = norm(b)
    b = torch.eye(len(valid), dtype=torch.float64)[0] if nb < tol else b / nb
    steps = 0
    for _ in range(max_iter):
        steps += 1
        cos = (gu @ b).clamp(-1.0, 1.0)
        phi = torch.arccos(cos)
        f = torch.where(phi < tol, 0.0, av * phi / torch.sin(phi).clamp_min(1e-6))
        t = f - (f * cos).sum() * b  # coefficients of T = sum_i f_i (u_i - c_i u)
        tn = norm(t)
        if tn < tol:
            break
        b = b * math.cos(tn) + t * (math.sin(tn) / tn)
        b = b / norm(b)
    coef = [0.0] * len(a)
    for j, i in enumerate(valid):
        coef[i] = scale * float(b[j]) / norms[i]
    return coef, steps


def _combine(xs: list[torch.Tensor], coef: list[float]) -> torch.Tensor:
    out = torch.zeros_like(xs[0])
    for c, x in zip(coef, xs, strict=True):
        if c:
            out.add_(x, alpha=c)
    return out


def karcher_mergekit(
    tensors: list[torch.Tensor], weights: list[float], max_iter: int, tol: float
) -> tuple[torch.Tensor, int]:
    """The Karcher mean with mergekit 0.1.5's arithmetic (numerics: mergekit): (output, steps taken)."""
    dt = tensors[0].dtype
    work = torch.float64 if dt == torch.float64 else torch.float32
    if len(tensors) == 1:
        return tensors[0].clone(), 0
    total = sum(weights)
    a = [w / total for w in weights]
    norms = [torch.linalg.vector_norm(x.to(work)) for x in tensors]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(dt)
        for x, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol and a[i] > 0]
    if not valid:
        return torch.zeros_like(tensors[0]), 0
    va = [a[i] for i in valid]
    va_sum = sum(va)
    alphas = [x / va_sum for x in va]
    us = [units[i] for i in valid]
    u = torch.zeros_like(us[0])
    for al, ui in zip(alphas, us, strict=True):
        u += al * ui
    un = torch.linalg.vector_norm(u.to(work))
    u = us[0].clone() if un.item() < tol else (u / un).to(dt)
    steps = 0
    for _ in range(max_iter):
        steps += 1
        tangent = torch.zeros_like(u)
        for al, ui in zip(alphas, us, strict=True):
            c = torch.clamp(torch.dot(u.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            phi = torch.arccos(c)
            if phi.item() < tol:
                continue
            tangent += al * (phi / torch.sin(phi)) * (ui - c * u)
        tn = torch.linalg.vector_norm(tangent.to(work))
        if tn.item() < tol:
            break
        u = (torch.cos(tn) * u + torch.sin(tn) * (tangent / tn)).to(dt)
        un = torch.linalg.vector_norm(u.to(work))
        if un.item() > tol:
            u = (u / un).to(dt)
    scale = sum(al * n for al, n in zip(a, norms, strict=True))
    return scale * u, steps


def karcher(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if p.numerics == "mergekit":
        out, ctx.stats["iterations"] = karcher_mergekit(tensors, list(weights), p.max_iter, p.tol)
        return out
    coef, steps = karcher_coefficients(flat_gram(tensors), list(weights), p.max_iter, p.tol)
    ctx.stats["iterations"] = steps
    return _combine(tensors, coef)


def _gather(st, k, base, xs, p, ctx) -> None:
    g = flat_gram(xs)
    st["g"] = g if st["g"] is None else st["g"] + g


def _end(st, k) -> None:
    st["coef"], st["steps"] = karcher_coefficients(st["g"], st["w"], st["p"].max_iter, st["p"].tol)


STREAM = Streamed(
    init=lambda p, ctx, n: {"g": None, "w": list(p.weight), "p": p},
    passes=1,
    gather=_gather,
    end_pass=_end,
    apply=lambda st, b, xs, w, p, ctx: _combine(xs, st["coef"]),
    finish=lambda st, ctx: ctx.stats.update(iterations=st["steps"]),
)


SPEC = MethodSpec(
    name="karcher",
    title="Karcher mean (Riemannian centre of mass of the directions, times the mean norm)",
    paper=(
        "Karcher 1977, Riemannian center of mass and mollifier smoothing, Comm. Pure Appl. Math. 30(5) "
        "(no arXiv); merging use as in mergekit, which cites arXiv:2603.04972"
    ),
    params=KarcherParams,
    kernel=karcher,
    streamed=STREAM,
    needs_base=False,
    min_models=2,
    check=_check,
    summary="theta = (sum_i a_i |theta_i|) * argmin_u sum_i a_i d_sphere(u, theta_i/|theta_i|)^2",
    mergekit_defaults={"numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}
