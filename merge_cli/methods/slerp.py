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

slerp `numerics: mergekit` (the default of mergekit-format recipes) evaluates the same formula the way
mergekit 0.1.5 does, rounding included: everything in fp32 (float64 for float64 inputs), norms as the
norm of per-2^20-element chunk norms, dot = sum of (v0/|v0|)(v1/|v1|), then arccos, sin and the two
coefficients in fp32. In row chunks the three sums come from the float64 gathering pass and the
coefficients are evaluated in fp32 from them.

nuslerp `numerics: mergekit` (the default of mergekit-format recipes) evaluates mergekit 0.1.5's nuslerp in
the compute dtype (bf16 with `dtype: bfloat16`): t = w2 / (w1 + w2) (0.5 when |w1 + w2| < 1e-6), unit
vectors x / max(|x|, 1e-7), cos = sum of their products clamped to [-1, 1], lerp only where
1 - cos^2 <= 1e-16 (not above 0.9995), else (sin((1-t) theta) x1 + sin(t theta) x2) / sin theta. Row-chunked
tensors use it per chunk when each vector lies in one chunk (along the last dim), else the exact form.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    Streamed,
    TensorCtx,
    mergekit_numerics,
    numerics_param,
    per_model,
)

DOT_THRESHOLD = 0.9995
EPS = 1e-8
MK_CHUNK = 1 << 20  # mergekit reduces norms and dots over chunks of this many elements


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


def slerp_work(dtype: torch.dtype) -> torch.dtype:
    """The dtype the two terms are combined in: fp32 at least (as mergekit)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def slerp_coefficients(t: float, aa, bb, ab, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) from the float64 sums, computed in float64 and cast to the work dtype."""
    na, nb = aa.sqrt(), bb.sqrt()
    dot = (ab / (torch.where(na > EPS, na, 1.0) * torch.where(nb > EPS, nb, 1.0))).clamp(-1.0, 1.0)
    lerp = dot.abs() > DOT_THRESHOLD
    omega = torch.arccos(dot)
    so = torch.where(lerp, 1.0, torch.sin(omega))
    c0 = torch.where(lerp, 1.0 - t, torch.sin((1.0 - t) * omega) / so).to(work)
    c1 = torch.where(lerp, t, torch.sin(t * omega) / so).to(work)
    return c0, c1


def slerp_apply(t: float, a: torch.Tensor, b: torch.Tensor, aa, bb, ab) -> torch.Tensor:
    """Slerp from the sums: coefficients in float64, combined in fp32 at least (bf16/fp16 inputs are
    rounded once, at the end)."""
    work = slerp_work(a.dtype)
    c0, c1 = slerp_coefficients(t, aa, bb, ab, work)
    return (c0 * a.to(work) + c1 * b.to(work)).to(a.dtype)


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str = "flat") -> torch.Tensor:
    """Slerp of the whole tensors ('flat') or of every vector along the last dim / dim 0."""
    return slerp_apply(t, v0, v1, *slerp_sums(v0, v1, mode))


def _mk_work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mk_coefficients(t: float, na: torch.Tensor, nb: torch.Tensor, dot_of) -> tuple[torch.Tensor, ...]:
    """mergekit's coefficient chain in the work dtype of na: norms <= EPS count as 1, dot = dot_of(na, nb)
    clamped, lerp above the threshold, else sin((1-t) theta)/sin theta and sin(t theta)/sin theta."""
    na = torch.where(na > EPS, na, 1)
    nb = torch.where(nb > EPS, nb, 1)
    dot = dot_of(na, nb).clamp(-1, 1)
    lerp = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(lerp, 0, dot))
    s = torch.sin(theta)
    tt = torch.full_like(dot, t)
    c0 = torch.where(lerp, 1 - tt, torch.sin((1 - tt) * theta) / s)
    c1 = torch.where(lerp, tt, torch.sin(tt * theta) / s)
    return c0, c1


def slerp_mergekit(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp of the whole flattened tensors with mergekit 0.1.5's arithmetic (numerics: mergekit)."""
    work = _mk_work(v0.dtype)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    n = a.shape[1]
    if n == 0:
        return v0.clone()
    spans = [(s, min(s + MK_CHUNK, n)) for s in range(0, n, MK_CHUNK)]

    def norm(x: torch.Tensor) -> torch.Tensor:  # the norm of the chunk norms
        parts = [torch.linalg.vector_norm(x[:, i:j].to(work), dim=1, keepdim=True) for i, j in spans]
        return torch.linalg.vector_norm(torch.stack(parts), dim=0)

    def dot(na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:  # normalised before multiplying
        parts = [
            ((a[:, i:j].to(work) / na) * (b[:, i:j].to(work) / nb)).sum(dim=1, keepdim=True) for i, j in spans
        ]
        return torch.stack(parts).sum(dim=0)

    c0, c1 = _mk_coefficients(t, norm(a), norm(b), dot)
    return (c0 * a.to(work) + c1 * b.to(work)).reshape(v0.shape).to(v0.dtype)


def mk_coefficients_from_sums(t: float, aa, bb, ab, work: torch.dtype) -> tuple[torch.Tensor, ...]:
    """numerics: mergekit in row chunks: (c0, c1) in the work dtype from the float64 sums."""
    na, nb = aa.sqrt().to(work), bb.sqrt().to(work)
    return _mk_coefficients(t, na, nb, lambda x, y: ab.to(work) / x / y)


def slerp_mergekit_from_sums(t: float, a: torch.Tensor, b: torch.Tensor, aa, bb, ab) -> torch.Tensor:
    """numerics: mergekit in row chunks: the float64 sums of the gathering pass, the coefficients in fp32."""
    work = _mk_work(a.dtype)
    c0, c1 = mk_coefficients_from_sums(t, aa, bb, ab, work)
    return (c0 * a.to(work) + c1 * b.to(work)).to(a.dtype)


class SlerpParams(MethodParams):
    t: float = Field(
        0.5, ge=0.0, le=1.0, description="interpolation position: 0 = base model, 1 = the other model"
    )
    numerics: Numerics = numerics_param(
        "norms, dot and coefficients in float64",
        "mergekit 0.1.5's fp32 evaluation (chunked norms, fp32 arccos/sin), to match its output bits",
    )


def slerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if p.numerics == "mergekit":
        return slerp_mergekit(p.t, base, tensors[0])
    return slerp_vectors(p.t, base, tensors[0])


def _slerp_chunk(st, b, xs, w, p, ctx) -> torch.Tensor:
    apply = slerp_mergekit_from_sums if p.numerics == "mergekit" else slerp_apply
    return apply(p.t, b, xs[0], *st["sums"])


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
    apply=_slerp_chunk,
)


class NuSlerpParams(MethodParams):
    weight: float = per_model(1.0, description="relative weight; t = w2 / (w1 + w2)")
    nuslerp_flatten: bool = Field(True, description="slerp the whole flattened tensor")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: slerp vectors along dim 0 instead of the last dim"
    )
    numerics: Numerics = numerics_param(
        "norms, dot and coefficients in float64, lerp above |cos| 0.9995",
        "mergekit 0.1.5's nuslerp in the compute dtype (lerp only for colinear vectors), to match its"
        " output bits",
    )


def nuslerp_mk_coefficients(t: float, cos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """numerics: mergekit: (colinear, sin((1-t) theta), sin(t theta), sin theta) in cos's dtype."""
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    return colinear, torch.sin((1 - t) * theta), torch.sin(t * theta), torch.sin(theta)


def nuslerp_mergekit(t: float, v0: torch.Tensor, v1: torch.Tensor, mode: str) -> torch.Tensor:
    """numerics: mergekit: mergekit's nuslerp of the whole flattened tensors ('flat') or of each vector
    along the last dim / dim 0, every step a torch op in the inputs' dtype."""
    shape = v0.shape
    if mode == "flat":
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif mode == "first":
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear, s0, s1, s = nuslerp_mk_coefficients(t, cos)
    out = (s0 * v0 + s1 * v1) / s
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if mode == "first":
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_t(weights, p: ParamSet) -> float:
    """t = w2 / (w1 + w2), 0.5 when the sum is ~0 (mergekit: below 1e-6)."""
    w1, w2 = weights
    if mergekit_numerics(p):
        return w2 / (w1 + w2) if abs(w1 + w2) >= 1e-6 else 0.5
    return w2 / (w1 + w2) if abs(w1 + w2) > EPS else 0.5


def nuslerp_mode(p: ParamSet) -> str:
    return "flat" if p.nuslerp_flatten else ("first" if p.nuslerp_row_wise else "last")


def _setup(base, tensors, weights, p: ParamSet):
    """(t, mode, a, b): t from the weights, the vectors (task vectors when there is a base)."""
    a, b = tensors
    if base is not None:
        a, b = a - base, b - base
    return nuslerp_t(weights, p), nuslerp_mode(p), a, b


def nuslerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    t, mode, a, b = _setup(base, tensors, weights, p)
    ctx.stats["t"] = t
    mk = mergekit_numerics(p)
    out = nuslerp_mergekit(t, a, b, mode) if mk else slerp_vectors(t, a, b, mode)
    return out if base is None else base + out


def _nu_gather(st, k, base, xs, p, ctx) -> None:
    t, mode, a, b = _setup(base, xs, st["weights"], p)
    if mode != "last":
        _accumulate(st, a, b, mode)


def _nu_apply(st, base, xs, weights, p, ctx) -> torch.Tensor:
    t, mode, a, b = _setup(base, xs, weights, p)
    ctx.stats["t"] = t
    if mode == "last" and mergekit_numerics(p):
        out = nuslerp_mergekit(t, a, b, mode)  # each vector lies in one chunk
    else:
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
    mergekit_defaults={"numerics": "mergekit"},
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
    mergekit_defaults={"numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name (CPU, every compute dtype,
# bitwise the plain kernels above).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "slerp": ("merge_cli.kernels.interp.run_slerp", "merge_cli.kernels.interp.slerp_chunked"),
    "nuslerp": ("merge_cli.kernels.interp.run_nuslerp", "merge_cli.kernels.interp.nuslerp_chunked"),
}
