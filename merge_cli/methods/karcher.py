"""Karcher (Riemannian) mean on the sphere of directions, scaled by the mean norm (METHODS.md §10).

Per tensor, flattened: n_i = |theta_i|, u_i = theta_i / n_i; inputs with n_i <= tol are dropped from the
direction (weights renormalised over the rest). u starts at normalise(sum a_i u_i) (u_1 if that is ~0) and
iterates, at most max_iter times:
    c_i = clamp(<u, u_i>, -1, 1),  phi_i = arccos(c_i)    (phi_i < tol is skipped)
    T = sum_i a_i phi_i / sin(phi_i) (u_i - c_i u)          (log map; sin clamped >= 1e-6 near antipodes)
    stop if |T| < tol, else u <- cos|T| u + sin|T| T/|T|   (exp map), renormalised
Output (sum_i a_i n_i) u with the original weights (zero-norm inputs included). fp32 torch on the device.
Weights a_i are the per-model `weight`s normalised to sum 1 (mergekit: equal weights, the default).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model


class KarcherParams(MethodParams):
    weight: float = per_model(1.0, ge=0.0, description="relative weight of this model (normalised to sum 1)")
    max_iter: int = Field(10, ge=1, description="maximum Riemannian gradient steps")
    tol: float = Field(1e-5, gt=0.0, description="convergence tolerance and zero-norm threshold")


def _check(p: ParamSet, n: int) -> str | None:
    if sum(p.weight) <= 0:
        return "the weights sum to 0; give at least one model a positive weight"
    return None


def karcher_mean(
    xs: list[torch.Tensor], weights: list[float], max_iter: int, tol: float
) -> tuple[torch.Tensor, int]:
    total = sum(weights)
    a = [w / total for w in weights]
    flat = [x.reshape(-1) for x in xs]
    norms = [float(torch.linalg.vector_norm(x)) for x in flat]
    scale = sum(ai * ni for ai, ni in zip(a, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > tol and a[i] > 0]
    if not valid:
        return torch.zeros_like(xs[0]), 0
    va = sum(a[i] for i in valid)
    units = [flat[i] / norms[i] for i in valid]
    av = [a[i] / va for i in valid]
    u = sum(ai * ui for ai, ui in zip(av, units, strict=True))
    un = float(torch.linalg.vector_norm(u))
    u = units[0].clone() if un < tol else u / un
    steps = 0
    for _ in range(max_iter):
        steps += 1
        t = torch.zeros_like(u)
        for ai, ui in zip(av, units, strict=True):
            c = torch.clamp(u @ ui, -1.0, 1.0)
            phi = torch.arccos(c)
            if float(phi) < tol:
                continue
            t = t + ai * (phi / torch.sin(phi).clamp_min(1e-6)) * (ui - c * u)
        tn = float(torch.linalg.vector_norm(t))
        if tn < tol:
            break
        u = u * math.cos(tn) + t * (math.sin(tn) / tn)
        u = u / torch.linalg.vector_norm(u)
    return (scale * u).reshape(xs[0].shape), steps


def karcher(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    out, steps = karcher_mean(tensors, list(weights), p.max_iter, p.tol)
    ctx.stats["iterations"] = steps
    return out


SPEC = MethodSpec(
    name="karcher",
    title="Karcher mean (Riemannian centre of mass of the directions, times the mean norm)",
    paper=(
        "Karcher 1977, Riemannian center of mass and mollifier smoothing, Comm. Pure Appl. Math. 30(5) "
        "(no arXiv); merging use as in mergekit, which cites arXiv:2603.04972"
    ),
    params=KarcherParams,
    kernel=karcher,
    needs_base=False,
    min_models=2,
    check=_check,
    summary="theta = (sum_i a_i |theta_i|) * argmin_u sum_i a_i d_sphere(u, theta_i/|theta_i|)^2",
    mergekit_defaults={},
)
