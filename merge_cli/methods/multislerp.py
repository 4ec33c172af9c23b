"""Multi-model spherical interpolation (mergekit `multislerp`), per tensor on the flattened tensor.

    x_i = theta_i (- theta0 if a base is given),  n_i = |x_i|,  u_i = x_i / n_i
    w_i normalised to sum 1 (normalize_weights),  m = normalise(sum_i w_i u_i)
    tau = sum_i w_i (u_i - <u_i, m> m)                  (tangent component at m)
    theta = (m cos|tau| + tau sin|tau| / |tau|) * sum_i w_i n_i  (+ theta0)

Since m is parallel to sum_i w_i u_i, tau is exactly zero (mergekit computes it and gets rounding noise):
the result is the weighted mean direction scaled to the weighted mean norm, computed as sum_i c_i x_i with
the c_i from the float64 Gram matrix of the inputs (one pass; huge tensors then merge in row chunks).
When sum_i w_i u_i is ~0 (opposed inputs) it falls back to sum_i w_i x_i.

`numerics: mergekit` (the default of mergekit-format recipes) evaluates the formula above literally, as
mergekit 0.1.5 does, on the full tensors in the compute dtype (fp32, or bf16 with `dtype: bfloat16`):
u_i = x_i / (n_i + eps), m, the tangent component tau (rounding noise, not zero) and its exp map, each
rounded in that dtype. Tensors merged in row chunks (too large to merge whole) use the exact
coefficients either way.
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
from merge_cli.methods.karcher import flat_gram


class MultiSlerpParams(MethodParams):
    weight: float = per_model(1.0, ge=0.0, description="weight of this model")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="norms below this count as zero")
    numerics: Numerics = numerics_param(
        "coefficients from the float64 Gram matrix (the tangent term is exactly zero)",
        "the literal formula on the full tensors in the compute dtype as mergekit 0.1.5 evaluates it,"
        " to match its output bits (row-chunked tensors: exact)",
    )


def _check(p: ParamSet, n: int) -> str | None:
    if sum(p.weight) <= 0:
        return "the weights sum to 0; give at least one model a positive weight"
    return None


def coefficients(g: torch.Tensor, weights: list[float], normalize: bool, eps: float) -> list[float]:
    """From the float64 Gram matrix of the x_i: c_i with output = sum_i c_i x_i."""
    w = [float(x) for x in weights]
    if normalize:
        tot = sum(w)
        w = [x / tot for x in w]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(len(w))]
    s = torch.tensor([wi / max(ni, eps) for wi, ni in zip(w, norms, strict=True)], dtype=torch.float64)
    s_norm = math.sqrt(max(float(s @ g.cpu() @ s), 0.0))  # |sum_i w_i u_i|
    if s_norm < eps:
        return w  # opposed inputs: the weighted sum
    scale = sum(wi * ni for wi, ni in zip(w, norms, strict=True)) / s_norm
    return [scale * float(x) for x in s]


def _inputs(base, tensors):
    return [t - base for t in tensors] if base is not None else list(tensors)


def _combine(base, xs: list[torch.Tensor], coef: list[float]) -> torch.Tensor:
    out = torch.zeros_like(xs[0]) if base is None else base.clone()
    for c, x in zip(coef, xs, strict=True):
        out.add_(x, alpha=c)
    return out


def multislerp_mergekit(base, tensors, weights: list[float], normalize: bool, eps: float) -> torch.Tensor:
    """The literal formula with mergekit 0.1.5's arithmetic, in the tensors' dtype (numerics: mergekit)."""
    x = torch.stack(tensors)
    if base is not None:
        x -= base
    flat = x.reshape(x.shape[0], -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    m = (units * w.view(-1, 1)).sum(0)
    m_norm = torch.linalg.vector_norm(m)
    if m_norm < eps:  # opposed inputs: the weighted sum
        out = flat[0] * w[0]
        for k in range(1, len(tensors)):
            out = out + flat[k] * w[k]
    else:
        del flat
        m = m / m_norm
        dots = (units * m).sum(-1, keepdim=True)
        tau = units.sub_(dots * m).mul_(w.view(-1, 1)).sum(0)  # units are not needed any more
        tau_norm = torch.linalg.vector_norm(tau) + eps
        out = m * torch.cos(tau_norm) + tau * (torch.sin(tau_norm) / tau_norm)
        out = out * (norms.squeeze(-1) * w).sum()
    out = out.reshape(x.shape[1:])
    return out if base is None else out + base


def multislerp(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if p.numerics == "mergekit":
        return multislerp_mergekit(base, list(tensors), list(weights), p.normalize_weights, p.eps)
    xs = _inputs(base, tensors)
    return _combine(base, xs, coefficients(flat_gram(xs), list(weights), p.normalize_weights, p.eps))


def _gather(st, k, base, xs, p, ctx) -> None:
    g = flat_gram(_inputs(base, xs))
    st["g"] = g if st["g"] is None else st["g"] + g


STREAM = Streamed(
    init=lambda p, ctx, n: {"g": None, "w": list(p.weight), "p": p},
    passes=1,
    gather=_gather,
    end_pass=lambda st, k: st.update(
        coef=coefficients(st["g"], st["w"], st["p"].normalize_weights, st["p"].eps)
    ),
    apply=lambda st, b, xs, w, p, ctx: _combine(b, _inputs(b, xs), st["coef"]),
)


SPEC = MethodSpec(
    name="multislerp",
    title="Multi-model spherical interpolation (weighted mean direction, weighted mean norm)",
    paper="Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257",
    params=MultiSlerpParams,
    kernel=multislerp,
    streamed=STREAM,
    needs_base=False,
    optional_base=True,
    min_models=2,
    check=_check,
    summary="theta = [theta0 +] normalise(sum_i w_i x_i/|x_i|) * sum_i w_i |x_i|,  x_i = theta_i [- theta0]",
    mergekit_defaults={"numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}
