"""Multi-model spherical interpolation (mergekit `multislerp`), per tensor on the flattened tensor.

    x_i = theta_i (- theta0 if a base is given),  n_i = |x_i|,  u_i = x_i / n_i
    w_i normalised to sum 1 (normalize_weights),  m = normalise(sum_i w_i u_i)
    tau = sum_i w_i (u_i - <u_i, m> m)                  (tangent component at m)
    theta = (m cos|tau| + tau sin|tau| / |tau|) * sum_i w_i n_i  (+ theta0)

Since m is parallel to sum_i w_i u_i, tau vanishes up to rounding: the result is the weighted mean direction
scaled to the weighted mean norm. When sum_i w_i u_i is ~0 (opposed inputs) it falls back to sum_i w_i x_i.
All in fp32 torch on the compute device.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model


class MultiSlerpParams(MethodParams):
    weight: float = per_model(1.0, ge=0.0, description="weight of this model")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="norms below this count as zero")


def _check(p: ParamSet, n: int) -> str | None:
    if sum(p.weight) <= 0:
        return "the weights sum to 0; give at least one model a positive weight"
    return None


def multislerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    eps = p.eps
    w = [float(x) for x in weights]
    if p.normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    xs = [(t - base if base is not None else t).reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [x / n.clamp_min(eps) for x, n in zip(xs, norms, strict=True)]
    s_u = sum(wi * u for wi, u in zip(w, units, strict=True))
    s_norm = torch.linalg.vector_norm(s_u)
    if float(s_norm) < eps:
        out = sum(wi * x for wi, x in zip(w, xs, strict=True))
    else:
        m = s_u / s_norm
        tau = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, units, strict=True))
        tn = torch.linalg.vector_norm(tau)
        direction = m * torch.cos(tn) + tau * (torch.sin(tn) / tn) if float(tn) > eps else m
        out = direction * sum(wi * n for wi, n in zip(w, norms, strict=True))
    out = out.reshape(tensors[0].shape)
    return out if base is None else base + out


SPEC = MethodSpec(
    name="multislerp",
    title="Multi-model spherical interpolation (weighted mean direction, weighted mean norm)",
    paper="Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257",
    params=MultiSlerpParams,
    kernel=multislerp,
    needs_base=False,
    optional_base=True,
    min_models=2,
    check=_check,
    summary="theta = [theta0 +] normalise(sum_i w_i x_i/|x_i|) * sum_i w_i |x_i|,  x_i = theta_i [- theta0]",
    mergekit_defaults={},
)
