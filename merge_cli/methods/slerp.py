"""Spherical linear interpolation: slerp (base = v0, one other model) and nuslerp (METHODS.md §9).

    dot = <v0/|v0|, v1/|v1|> clamped to [-1, 1]   (a vector with norm <= 1e-8 is not normalised)
    |dot| > 0.9995: lerp (1 - t) v0 + t v1
    else Omega = arccos(dot): sin((1 - t) Omega)/sin Omega v0 + sin(t Omega)/sin Omega v1

on the unnormalised v0, v1, in fp32 torch on the compute device. slerp works on the whole flattened tensor.
nuslerp takes t = w2 / (w1 + w2) (0.5 when the sum is ~0) from the two models' weights; with a base it
interpolates the task vectors (theta0 + slerp(t, tau_1, tau_2)); without `nuslerp_flatten` it does one
slerp per vector along the last dim, or along dim 0 with `nuslerp_row_wise` (flatten wins over row_wise).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Slerp of the whole tensors (dim None) or of every vector along `dim`."""
    shape, dtype = v0.shape, v0.dtype
    # always fp32 (as mergekit): in bf16 the 0.9995 threshold itself rounds to 1.0, so a dot that rounds to
    # 1.0 takes the slerp branch with sin(omega) = 0 and the whole tensor becomes NaN
    v0, v1 = v0.float(), v1.float()
    if dim is None or v0.dim() <= 1:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        a, b = v0.movedim(dim, -1), v1.movedim(dim, -1)
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    ua = torch.where(na > EPS, a / torch.where(na > EPS, na, 1.0), a)
    ub = torch.where(nb > EPS, b / torch.where(nb > EPS, nb, 1.0), b)
    dot = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    lerp = dot.abs() > DOT_THRESHOLD
    omega = torch.arccos(dot)
    so = torch.where(lerp, torch.ones_like(omega), torch.sin(omega))
    c0 = torch.where(lerp, torch.full_like(dot, 1.0 - t), torch.sin((1.0 - t) * omega) / so)
    c1 = torch.where(lerp, torch.full_like(dot, t), torch.sin(t * omega) / so)
    out = (c0 * a + c1 * b).to(dtype)
    if dim is None or v0.dim() <= 1:
        return out.reshape(shape)
    return out.movedim(-1, dim)


class SlerpParams(MethodParams):
    t: float = Field(
        0.5, ge=0.0, le=1.0, description="interpolation position: 0 = base model, 1 = the other model"
    )


def slerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    return slerp_vectors(p.t, base, tensors[0])


class NuSlerpParams(MethodParams):
    weight: float = per_model(1.0, description="relative weight; t = w2 / (w1 + w2)")
    nuslerp_flatten: bool = Field(True, description="slerp the whole flattened tensor")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: slerp vectors along dim 0 instead of the last dim"
    )


def nuslerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    w1, w2 = weights
    t = w2 / (w1 + w2) if abs(w1 + w2) > EPS else 0.5
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    dim = None if p.nuslerp_flatten else (0 if p.nuslerp_row_wise else -1)
    out = slerp_vectors(t, a, b, dim)
    ctx.stats["t"] = t
    return out if base is None else base + out


SLERP = MethodSpec(
    name="slerp",
    title="Spherical linear interpolation of two models",
    paper="Shoemake 1985, Animating rotation with quaternion curves, SIGGRAPH 1985 (no arXiv); merging use: mergekit",
    params=SlerpParams,
    kernel=slerp,
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="theta = sin((1-t) W)/sin W theta0 + sin(t W)/sin W theta1,  cos W = <theta0, theta1>/(|theta0||theta1|)",
    mergekit_defaults={},
)

NUSLERP = MethodSpec(
    name="nuslerp",
    title="Normalized SLERP of two models or of two task vectors (weights give t)",
    paper="Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257",
    params=NuSlerpParams,
    kernel=nuslerp,
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    summary="theta = [theta0 +] slerp(w2/(w1+w2), x1, x2),  x_i = theta_i [- theta0], per tensor or per vector",
    mergekit_defaults={},
)
