"""Fast forms of model_stock (methods/model_stock.py) in every compute dtype, bitwise the plain kernels' output,
built as kernels/interp.py builds slerp's: the task vectors and the products whose sums give the Gram
matrix or the norms and dots are made block by block in reused scratch buffers and reduced by the plain
kernels' own torch calls on the same shapes; t and c come from the plain kernels' functions; the
interpolation t * mean + (1 - t) * base runs tile by tile into the preallocated output."""

from __future__ import annotations

from typing import Any

import torch

from merge_cli.kernels.interp import blend, coef2, finite, in_cd, prod_sum, sq_norms, subs_cd, tau_sq
from merge_cli.methods import model_stock as M
from merge_cli.methods.base import mergekit_numerics


def _taus(base, xs, cd) -> list[torch.Tensor]:
    return subs_cd(xs, base, cd, [f"tau{i}" for i in range(len(xs))])


def gram(taus: list[torch.Tensor], per_row: bool) -> torch.Tensor:
    """model_stock.gram(_rows(stack(taus), per_row)), bitwise: float64 products in scratch, summed per row."""
    k = len(taus)
    rows = [t.reshape(t.shape[0], -1) if (per_row and t.dim() >= 2) else t.reshape(1, -1) for t in taus]
    g = torch.zeros(k, k, rows[0].shape[0], dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = prod_sum(rows[i], rows[j], -1, torch.float64, "p64", keep=False)
    return g


def _exact_out(base, xs, t: torch.Tensor, out: torch.Tensor, cd, st: dict) -> None:
    """model_stock._interpolate, tile by tile: stack(xs).mean(0) blended with the base by t (per row)."""
    tt = t.to(cd)
    mode = "rows" if t.numel() > 1 else "flat"
    tt = coef2(tt if t.numel() > 1 else tt.reshape(()), mode, base)
    st["t"].append(t)

    def fn(b, *rest):
        *parts, a, om = rest
        mean = torch.stack([in_cd(x, cd) for x in parts]).mean(dim=0)
        return a * mean + om * in_cd(b, cd)

    blend(out, (base, *xs), (tt, 1 - tt), mode, fn)


def _mk_out(base, xs, t: torch.Tensor, mode: str, out: torch.Tensor, cd) -> None:
    """mergekit_interpolate's output, tile by tile: the running sum of the models / K, blended by t."""
    k = len(xs)
    tt = coef2(t, mode, base)

    def fn(b, *rest):
        *parts, a, om = rest
        mean = in_cd(parts[0], cd)
        for x in parts[1:]:
            mean = mean + in_cd(x, cd)
        mean = mean / k
        return a * mean + om * in_cd(b, cd)

    blend(out, (base, *xs), (tt, 1 - tt), mode, fn)


def run_model_stock(base, xs, weights, p, out_dtype, stats: dict[str, Any], ctx, cd) -> torch.Tensor:
    taus = _taus(base, xs, cd)
    out = torch.empty(base.shape, dtype=out_dtype)
    st: dict = {"t": []}
    if mergekit_numerics(p):
        views = [M._mk_rows(t, p.filter_wise) for t in taus]
        norms = [torch.norm(v, dim=-1) for v in views]
        t, c = M.mergekit_ratio(
            p,
            len(views),
            lambda i: norms[i],
            lambda i, j: prod_sum(views[i], views[j], -1, cd, "pcd", keep=False),
        )
        ok = finite(*norms)
        st["t"].append(t.double())
        _mk_out(base, xs, t, "last" if p.filter_wise else "flat", out, cd)
        c = c.double()
    else:
        g = gram(taus, p.filter_wise)
        ok = finite(g)
        t, c = M.interpolation_ratio(g, p.angle_mean, p.clamp_cos)
        _exact_out(base, xs, t, out, cd, st)
    M._record(st, c, ctx)
    stats["_nonfinite"] = [int(not ok)] + [0] * len(xs)
    stats["_sqnorms"] = tau_sq(*taus)
    return out


def stock_chunked(p, cd):
    """model_stock's STREAM in its fast form (see interp.slerp_chunked)."""

    def gather(st, b, xs) -> bool | None:
        if p.filter_wise and b.dim() >= 2:
            return None  # nothing reduced here: the caller checks the chunk
        g = gram(_taus(b, xs, cd), False)
        st["g"] = g if st["g"] is None else st["g"] + g
        return finite(g)

    def apply(st, b, xs, weights, out_dtype, ctx):
        taus = _taus(b, xs, cd)
        g = st["g"] if st["g"] is not None else gram(taus, True)
        t, c = M.interpolation_ratio(g, p.angle_mean, p.clamp_cos)
        st["c"].append(c)
        out = torch.empty(b.shape, dtype=out_dtype)
        _exact_out(b, xs, t, out, cd, st)
        return out, tau_sq(*taus)

    return gather, apply


__all__ = ["run_model_stock", "sq_norms", "stock_chunked"]
