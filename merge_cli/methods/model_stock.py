"""Model Stock (METHODS.md §8): interpolate between the base and the average of K >= 2 fine-tunes.

    c = mean over pairs i < j of cos(tau_i, tau_j)          (mergekit; or cos(mean pairwise angle), `angle_mean`)
    t = K c / (1 + (K - 1) c)
    theta = t * mean_i(theta_i) + (1 - t) * theta0

Per tensor, or per row with `filter_wise` (rows = shape[0]; a 1-D tensor is one row). The norm product is
clamped to >= 1e-6 (zero task vectors give c = 0, t = 0: the base). c is clamped to [0, 1] by default
(`clamp_cos`), so t stays in [0, 1] and the result on the segment theta0 - mean(theta_i); with
`clamp_cos: false` (mergekit) c lies in [-1, 1] and a denominator |1 + (K-1)c| < 1e-6 gives t = 0.
Model weights are not used. Dot products are summed in float64; huge tensors are merged in row chunks
after one pass that sums the Gram matrix of the task vectors.

`numerics: mergekit` (the default of mergekit-format recipes) evaluates t as mergekit 0.1.5 does, in the
compute dtype: torch norms and dot products of the task vectors (flattened, or per vector along the last
dim with filter_wise), each pair's cosine clamped to [-1, 1], their mean, then t; the mean of the models
is their running sum in the compute dtype divided by K. Tensors merged in row chunks keep the exact t.
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
)


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one t per row instead of per tensor")
    angle_mean: bool = Field(
        False, description="average the pairwise angles, then take the cosine (fusion_bench)"
    )
    clamp_cos: bool = Field(True, description="clamp the mean cosine to [0, 1] (false: [-1, 1] as mergekit)")
    numerics: Numerics = numerics_param(
        "float64 dot products and norms, t in float64",
        "t from norms and dots in the compute dtype and the models' running sum, as mergekit 0.1.5, to match"
        " its output bits (row-chunked tensors: exact)",
    )


def gram(deltas) -> torch.Tensor:
    """deltas [K, R, n] (or a list of K [R, n]) -> G [K, K, R]: float64 dot products of every pair, per row."""
    k = len(deltas)
    g = torch.zeros(k, k, deltas[0].shape[0], dtype=torch.float64, device=deltas[0].device)
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = (deltas[i].double() * deltas[j].double()).sum(dim=-1)
    return g


def interpolation_ratio(
    g: torch.Tensor, angle_mean: bool, clamp_cos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the Gram matrix [K, K, R]: (t, c), each of shape [R] (float64)."""
    k = g.shape[0]
    norms = torch.stack([g[i, i] for i in range(k)]).clamp_min(0).sqrt()
    acc = torch.zeros_like(g[0, 0])
    pairs = 0
    for i in range(k):
        for j in range(i + 1, k):
            cos = (g[i, j] / (norms[i] * norms[j]).clamp_min(1e-6)).clamp(-1.0, 1.0)
            acc = acc + (torch.arccos(cos) if angle_mean else cos)
            pairs += 1
    c = acc / pairs
    if angle_mean:
        c = torch.cos(c)
    if clamp_cos:
        c = c.clamp(0.0, 1.0)
    den = 1 + (k - 1) * c
    small = den.abs() < 1e-6
    t = torch.where(small, 0.0, k * c / torch.where(small, 1.0, den))
    return t, c


def _rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """[K, ...] -> [K, R, n]: one row per tensor, or per row (dim 0) with filter_wise on a >= 2-D tensor."""
    return (
        x.reshape(x.shape[0], x.shape[1], -1)
        if (filter_wise and x.dim() >= 3)
        else x.reshape(x.shape[0], 1, -1)
    )


def _mk_rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """mergekit's view: flattened, or (filter_wise) vectors along the last dim, a 1-D tensor as one row."""
    if not filter_wise:
        return x.reshape(-1)
    return x.reshape(1, -1) if x.dim() < 2 else x


def mergekit_interpolate(base, tensors, p: ParamSet, st: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """numerics: mergekit: (output, c). Everything in the compute dtype: torch norms and dots of the task
    vectors, each pair's cosine clamped to [-1, 1], their mean, t; the mean of the models as their running
    sum divided by K; then t * mean + (1 - t) * theta0."""
    b = _mk_rows(base, p.filter_wise)
    xs = [_mk_rows(x, p.filter_wise) for x in tensors]
    taus = [x - b for x in xs]
    t, c = mergekit_ratio(
        p, len(taus), lambda i: torch.norm(taus[i], dim=-1), lambda i, j: (taus[i] * taus[j]).sum(dim=-1)
    )
    k = len(tensors)
    mean = xs[0]
    for x in xs[1:]:
        mean = mean + x
    mean = mean / k
    st["t"].append(t.double())
    return (t * mean + (1 - t) * b).reshape(base.shape), c.double()


def mergekit_ratio(p: ParamSet, k: int, norm_of, dot_of) -> tuple[torch.Tensor, torch.Tensor]:
    """numerics: mergekit: (t, c) in the compute dtype, each with a trailing dim of 1, from the task
    vectors' norms (norm_of(i)) and dot products (dot_of(i, j)), per vector."""
    per_pair = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = norm_of(i) * norm_of(j)
            cos = (dot_of(i, j) / norms.clamp(min=1e-6)).clamp(-1, 1)
            per_pair.append(torch.arccos(cos) if p.angle_mean else cos)
    c = torch.stack(per_pair).mean(dim=0)
    if p.angle_mean:
        c = torch.cos(c)
    if p.clamp_cos:
        c = c.clamp(0.0, 1.0)
    c = c.unsqueeze(-1)
    den = 1 + (k - 1) * c
    small = den.abs() < 1e-6
    t = torch.where(small, torch.zeros_like(c), (k * c) / torch.where(small, torch.ones_like(den), den))
    return t, c


def _interpolate(base, tensors, t: torch.Tensor, st: dict) -> torch.Tensor:
    mean = torch.stack(tensors).mean(dim=0)
    tt = (
        t.to(base.dtype).reshape(-1, *([1] * (base.dim() - 1)))
        if t.numel() > 1
        else t.to(base.dtype).reshape(())
    )
    st["t"].append(t)
    return tt * mean + (1 - tt) * base


def _record(st: dict, c: torch.Tensor | None, ctx: TensorCtx) -> None:
    ctx.stats["t"] = float(torch.cat([x.reshape(-1) for x in st["t"]]).mean())
    cs = st["c"] if c is None else [c]
    ctx.stats["cos"] = float(torch.cat([x.reshape(-1) for x in cs]).mean())


def model_stock(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    st = {"t": []}
    if mergekit_numerics(p):
        out, c = mergekit_interpolate(base, tensors, p, st)
        _record(st, c, ctx)
        return out
    g = gram(_rows(torch.stack([t - base for t in tensors]), p.filter_wise))
    t, c = interpolation_ratio(g, p.angle_mean, p.clamp_cos)
    out = _interpolate(base, tensors, t, st)
    _record(st, c, ctx)
    return out


def _gather(st, k, base, xs, p, ctx) -> None:
    if not (p.filter_wise and base.dim() >= 2):
        g = gram(_rows(torch.stack([x - base for x in xs]), False))
        st["g"] = g if st["g"] is None else st["g"] + g


def _apply(st, base, xs, weights, p, ctx) -> torch.Tensor:
    g = st["g"] if st["g"] is not None else gram(_rows(torch.stack([x - base for x in xs]), True))
    t, c = interpolation_ratio(g, p.angle_mean, p.clamp_cos)
    st["c"].append(c)
    return _interpolate(base, xs, t, st)


# row chunks: per tensor, one pass sums the Gram matrix; filter_wise rows are merged chunk by chunk
STREAM = Streamed(
    init=lambda p, ctx, n: {"g": None, "t": [], "c": []},
    passes=1,
    gather=_gather,
    end_pass=lambda st, k: None,
    apply=_apply,
    finish=lambda st, ctx: _record(st, None, ctx),
)


SPEC = MethodSpec(
    name="model_stock",
    title="Model Stock (base-to-average interpolation from task-vector angles)",
    paper="Jang, Yun, Han 2024, Model Stock: All we need is just a few fine-tuned models, ECCV 2024, arXiv:2403.19522",
    params=ModelStockParams,
    kernel=model_stock,
    streamed=STREAM,
    needs_base=True,
    min_models=2,
    summary="theta = t mean_i(theta_i) + (1 - t) theta0,  t = K cos / (1 + (K - 1) cos),  cos = mean pairwise cos(tau_i, tau_j)",
    mergekit_defaults={"clamp_cos": False, "numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name (CPU, every compute dtype,
# bitwise the plain kernels above).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "model_stock": ("merge_cli.kernels.stock.run_model_stock", "merge_cli.kernels.stock.stock_chunked"),
}
