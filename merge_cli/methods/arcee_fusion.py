"""Arcee Fusion (mergekit `arcee_fusion`): take the other model's update only where it matters most.

    d = theta1 - theta0
    KL_row = sum_j softmax(theta1)_j (log softmax(theta1)_j - log softmax(theta0)_j)   (over the last dim)
    importance = |d| * KL_row                        (each entry times the KL of its row)
    threshold = median(importance) + 1.5 IQR(importance)
    theta = theta0 + [importance >= threshold] * d

The median and quartiles are exact, over the whole tensor (kthvalue order statistics with linear
interpolation, as torch.quantile), with no sampling; mergekit estimates them from a sample of at most
1M entries, so results can differ slightly on tensors larger than that. Huge tensors are merged in row
chunks after two radix passes that find the same order statistics exactly (selection.StreamingTopK).
"""

from __future__ import annotations

import math

import torch

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, Streamed, TensorCtx
from merge_cli.methods.selection import StreamingTopK


class ArceeFusionParams(MethodParams):
    pass


QUARTILES = (0.25, 0.5, 0.75)


def ranks(n: int) -> list[int]:
    """The 0-based order statistics the three quartiles interpolate between."""
    return sorted({r for q in QUARTILES for r in (math.floor(q * (n - 1)), math.ceil(q * (n - 1)))})


def _q(stats: dict[int, float], n: int, q: float) -> float:
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return stats[lo] + (stats[hi] - stats[lo]) * (pos - lo)


def threshold(stats: dict[int, float], n: int) -> float:
    """median + 1.5 IQR from exact order statistics (linear interpolation, as torch.quantile)."""
    return _q(stats, n, 0.5) + 1.5 * (_q(stats, n, 0.75) - _q(stats, n, 0.25))


def quantile(x: torch.Tensor, q: float) -> float:
    """Exact q-quantile of all entries of x, any size (kthvalue order statistics)."""
    flat = x.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    stats = {r: float(torch.kthvalue(flat, r + 1).values) for r in {math.floor(pos), math.ceil(pos)}}
    return _q(stats, n, q)


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|d| times the KL divergence of each row (softmax over the last dim); KL clamped >= 0 against rounding."""
    if base.dim() == 0:
        return torch.zeros_like(base)
    logp = torch.log_softmax(other, dim=-1)
    logq = torch.log_softmax(base, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1, keepdim=True).clamp_min(0.0)
    return (other - base).abs() * kl


def _fuse(base, other, imp: torch.Tensor, thr: float, st: dict) -> torch.Tensor:
    mask = imp >= thr
    st["kept"] += int(mask.sum())
    st["numel"] += base.numel()
    return base + mask * (other - base)


def _record(st: dict, ctx: TensorCtx) -> None:
    ctx.stats["kept_fraction"] = [st["kept"] / max(st["numel"], 1)]


def arcee_fusion(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    other = tensors[0]
    imp = importance(base, other)
    flat, n = imp.reshape(-1), imp.numel()
    stats = {r: float(torch.kthvalue(flat, r + 1).values) for r in ranks(n)}
    st = {"kept": 0, "numel": 0}
    out = _fuse(base, other, imp, threshold(stats, n), st)
    _record(st, ctx)
    return out


def _init(p, ctx, n_models) -> dict:
    n = math.prod(ctx.shape)
    return {"n": n, "sel": {r: StreamingTopK(n - r, n) for r in ranks(n)}, "thr": None, "kept": 0, "numel": 0}


def _gather(st, k, base, xs, p, ctx) -> None:
    imp = importance(base, xs[0])
    for sel in st["sel"].values():
        sel.update(imp)


def _end_pass(st, k) -> None:
    if k == 0:
        for sel in st["sel"].values():
            sel.next_pass()
    else:
        st["thr"] = threshold({r: sel.result().value for r, sel in st["sel"].items()}, st["n"])


# row chunks (rows along the last dim stay whole): two radix passes find the exact order statistics
STREAM = Streamed(
    init=_init,
    passes=2,
    gather=_gather,
    end_pass=_end_pass,
    apply=lambda st, b, xs, w, p, ctx: _fuse(b, xs[0], importance(b, xs[0]), st["thr"], st),
    finish=_record,
)


SPEC = MethodSpec(
    name="arcee_fusion",
    title="Arcee Fusion (keep the updates whose KL-weighted importance is an outlier)",
    paper=(
        "No paper: Arcee AI 2025, introduced with mergekit; see Goddard et al. 2024, Arcee's MergeKit: "
        "A Toolkit for Merging Large Language Models, arXiv:2403.13257"
    ),
    params=ArceeFusionParams,
    kernel=arcee_fusion,
    streamed=STREAM,
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="theta = theta0 + [imp >= median + 1.5 IQR] (theta1 - theta0),  imp = |theta1 - theta0| KL_row",
    mergekit_defaults={},
)
