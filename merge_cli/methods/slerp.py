"""Spherical linear interpolation: slerp (base = v0, one other model) and nuslerp (METHODS.md §9).

    dot = <v0/|v0|, v1/|v1|> clamped to [-1, 1]   (a vector with norm <= 1e-8 is not normalised)
    |dot| > 0.9995: lerp (1 - t) v0 + t v1
    else Omega = arccos(dot): sin((1 - t) Omega)/sin Omega v0 + sin(t Omega)/sin Omega v1

on the unnormalised v0, v1, in fp32 torch on the compute device. slerp works on the whole flattened tensor.
nuslerp takes t = w2 / (w1 + w2) (0.5 when the sum is ~0) from the two models' weights; with a base it
interpolates the task vectors (theta0 + slerp(t, tau_1, tau_2)); without `nuslerp_flatten` it does one
slerp per vector along the last dim, or along dim 0 with `nuslerp_row_wise` (flatten wins over row_wise).
Norms and dot products are summed in float64 and the two coefficients computed in float64; huge tensors
are merged in row chunks after one pass that gathers those sums.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, Streamed, TensorCtx, per_model

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _dims(x: torch.Tensor, mode: str) -> tuple[int, ...]:
    """Reduction dims: 'flat' = the whole tensor, 'last' = each vector along the last dim, 'first' = along dim 0."""
    if mode == "flat" or x.dim() <= 1:
        return tuple(range(x.dim()))
    return (x.dim() - 1,) if mode == "last" else (0,)


def slerp_sums(a: torch.Tensor, b: torch.Tensor, mode: str = "flat") -> tuple[torch.Tensor, ...]:
    """(|a|^2, |b|^2, <a, b>) in float64, reduced per `mode` (kept dims, so they broadcast back)."""
    a64, b64 = a.double(), b.double()
    dims = _dims(a, mode)
    return tuple((x * y).sum(dim=dims, keepdim=True) for x, y in ((a64, a64), (b64, b64), (a64, b64)))


def slerp_apply(t: float, a: torch.Tensor, b: torch.Tensor, aa, bb, ab) -> torch.Tensor:
    """Slerp from the sums: coefficients in float64, combined in the inputs' dtype."""
    na, nb = aa.sqrt(), bb.sqrt()
    dot = (ab / (torch.where(na > EPS, na, 1.0) * torch.where(nb > EPS, nb, 1.0))).clamp(-1.0, 1.0)
    lerp = dot.abs() > DOT_THRESHOLD
    omega = torch.arccos(dot)
    so = torch.where(lerp, 1.0, torch.sin(omega))
    c0 = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * omega) / so).to(a.dtype)
    c1 = torch.where(lerp, t, torch.sin(t * omega) / so).to(a.dtype)
    return c0 * a + c1 * b


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str = "flat") -> torch.Tensor:
    """Slerp of the whole tensors ('flat') or of every vector along the last dim / dim 0."""
    return slerp_apply(t, v0, v1, *slerp_sums(v0, v1, mode))


class SlerpParams(MethodParams):
    t: float = Field(
        0.5, ge=0.0, le=1.0, description="interpolation position: 0 = base model, 1 = the other model"
    )


def slerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    return slerp_vectors(p.t, base, tensors[0])


def _accumulate(st: dict, a: torch.Tensor, b: torch.Tensor, mode: str) -> None:
    sums = slerp_sums(a, b, mode)
    st["sums"] = (
        sums if st.get("sums") is None else tuple(x + y for x, y in zip(st["sums"], sums, strict=True))
    )


# row chunks: one pass gathers the norms and the dot product (per tensor, or per column for dim 0)
SLERP_STREAM = Streamed(
    init=lambda p, ctx, n: {"sums": None},
    passes=1,
    gather=lambda st, k, b, xs, p, ctx: _accumulate(st, b, xs[0], "flat"),
    end_pass=lambda st, k: None,
    apply=lambda st, b, xs, w, p, ctx: slerp_apply(p.t, b, xs[0], *st["sums"]),
)


class NuSlerpParams(MethodParams):
    weight: float = per_model(1.0, description="relative weight; t = w2 / (w1 + w2)")
    nuslerp_flatten: bool = Field(True, description="slerp the whole flattened tensor")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: slerp vectors along dim 0 instead of the last dim"
    )


def _setup(base, tensors, weights, p: ParamSet):
    """(t, mode, a, b): t from the weights, the vectors (task vectors when there is a base)."""
    w1, w2 = weights
    t = w2 / (w1 + w2) if abs(w1 + w2) > EPS else 0.5
    mode = "flat" if p.nuslerp_flatten else ("first" if p.nuslerp_row_wise else "last")
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    return t, mode, a, b


def nuslerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    t, mode, a, b = _setup(base, tensors, weights, p)
    ctx.stats["t"] = t
    out = slerp_vectors(t, a, b, mode)
    return out if base is None else base + out


def _nu_gather(st, k, base, xs, p, ctx) -> None:
    t, mode, a, b = _setup(base, xs, st["weights"], p)
    if mode != "last":
        _accumulate(st, a, b, mode)


def _nu_apply(st, base, xs, weights, p, ctx) -> torch.Tensor:
    t, mode, a, b = _setup(base, xs, weights, p)
    ctx.stats["t"] = t
    out = slerp_apply(t, a, b, *(slerp_sums(a, b, mode) if mode == "last" else st["sums"]))
    return out if base is None else base + out


NUSLERP_STREAM = Streamed(
    init=lambda p, ctx, n: {"sums": None, "weights": list(p.weight)},
    passes=1,
    gather=_nu_gather,
    end_pass=lambda st, k: None,
    apply=_nu_apply,
)


SLERP = MethodSpec(
    name="slerp",
    title="Spherical linear interpolation of two models",
    paper="Shoemake 1985, Animating rotation with quaternion curves, SIGGRAPH 1985 (no arXiv); merging use: mergekit",
    params=SlerpParams,
    kernel=slerp,
    streamed=SLERP_STREAM,
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
    streamed=NUSLERP_STREAM,
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    summary="theta = [theta0 +] slerp(w2/(w1+w2), x1, x2),  x_i = theta_i [- theta0], per tensor or per vector",
    mergekit_defaults={},
)
