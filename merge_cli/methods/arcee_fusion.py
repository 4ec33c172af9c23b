"""Arcee Fusion (mergekit `arcee_fusion`): take the other model's update only where it matters most.

    d = theta1 - theta0
    KL_row = sum_j softmax(theta1)_j (log softmax(theta1)_j - log softmax(theta0)_j)   (over the last dim,
             in float64: the KL of two nearly equal rows is ~1e-6 and fp32 would lose most of its digits)
    importance = |d| * KL_row                        (each entry times the KL of its row)
    threshold = median(importance) + 1.5 IQR(importance)
    theta = theta0 + [importance >= threshold] * d

The median and quartiles are exact, over the whole tensor (kthvalue order statistics with linear
interpolation, as torch.quantile), with no sampling; mergekit estimates them from a sample of at most
1M entries, so results can differ slightly on tensors larger than that. Huge tensors are merged in row
chunks after two radix passes that find the same order statistics exactly (selection.StreamingTopK).

`numerics: mergekit` (the default of mergekit-format recipes) computes the mask as mergekit 0.1.5 does:
KL_row = sum_j p_j log(p_j / q_j) with p = softmax(theta1) + 1e-8, q = softmax(theta0) + 1e-8, evaluated
naively in the compute dtype (fp32, or bf16 with `dtype: bfloat16`; not clamped: rounding can make it
negative); quartiles are order statistics without interpolation (sorted[floor(q (n - 1))]) and
median + 1.5 (q3 - q1) is rounded in the compute dtype. The naive KL of two nearly equal rows loses most
of its digits to cancellation (log of a ratio ~ 1), so rounding noise decides part of mergekit's mask;
this reproduces it. Only mergekit's quartile sampling of tensors above 1M entries is not reproduced (a
different random generator): the order statistics are exact over the whole tensor.
"""

from __future__ import annotations

import math

import torch

from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    Streamed,
    TensorCtx,
    numerics_param,
)
from merge_cli.methods.selection import StreamingTopK
from merge_cli.methods.wholemodel import RadixSelect


class ArceeFusionParams(MethodParams):
    numerics: Numerics = numerics_param(
        "KL from log-softmax differences, interpolated exact quartiles",
        "mergekit 0.1.5's naive KL of (softmax + 1e-8) in the compute dtype and its un-interpolated"
        " quartiles, to match its mask",
    )


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
    """|d| times the KL divergence of each row (softmax over the last dim), the KL evaluated in float64 and
    clamped >= 0 against rounding. In fp32 the KL of two nearly equal rows (~1e-6) would lose most of its
    digits: each log-softmax carries an error of about one ulp of its log-sum-exp (~5e-7)."""
    if base.dim() == 0:
        return torch.zeros_like(base)
    logp = torch.log_softmax(other.double(), dim=-1)
    logq = torch.log_softmax(base.double(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1, keepdim=True).clamp_min(0.0)
    return (other - base).abs() * kl.to(other.dtype)


MK_EPS = 1e-8  # mergekit adds this to both softmax outputs


def importance_mergekit(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mergekit's importance: |d| times sum_j p_j log(p_j / q_j), p, q = softmax + 1e-8, in the inputs' dtype."""
    if base.dim() == 0:
        return torch.zeros_like(base)
    p = torch.softmax(other, dim=-1) + MK_EPS
    q = torch.softmax(base, dim=-1) + MK_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (other - base).abs() * kl


def mk_ranks(n: int) -> list[int]:
    """0-based ranks of mergekit's quartiles: sorted[floor(q (n - 1))] for q = 1/4, 1/2, 3/4."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def mk_threshold(values: list[float], dtype: torch.dtype) -> float:
    """median + 1.5 (q3 - q1), each step rounded in `dtype` (values: q1, median, q3)."""
    q1, med, q3 = torch.tensor(values, dtype=dtype)
    return float(med + 1.5 * (q3 - q1))


def _importance(p: ParamSet):
    return importance_mergekit if p.numerics == "mergekit" else importance


def _fuse(base, other, imp: torch.Tensor, thr: float, st: dict) -> torch.Tensor:
    mask = imp >= thr
    st["kept"] += int(mask.sum())
    st["numel"] += base.numel()
    return base + mask * (other - base)


def _record(st: dict, ctx: TensorCtx) -> None:
    ctx.stats["kept_fraction"] = [st["kept"] / max(st["numel"], 1)]


def arcee_fusion(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    other = tensors[0]
    imp = _importance(p)(base, other)
    flat, n = imp.reshape(-1), imp.numel()
    if p.numerics == "mergekit":
        thr = mk_threshold([float(torch.kthvalue(flat, r + 1).values) for r in mk_ranks(n)], imp.dtype)
    else:
        thr = threshold({r: float(torch.kthvalue(flat, r + 1).values) for r in ranks(n)}, n)
    st = {"kept": 0, "numel": 0}
    out = _fuse(base, other, imp, thr, st)
    _record(st, ctx)
    return out


def _init(p, ctx, n_models) -> dict:
    n = math.prod(ctx.shape)
    st = {"n": n, "thr": None, "kept": 0, "numel": 0, "mk": None}
    if p.numerics == "mergekit":  # the naive KL may be negative: a radix select over signed keys
        st["mk"] = RadixSelect([r + 1 for r in mk_ranks(n)])
        st["sel"] = {}
    else:
        st["sel"] = {r: StreamingTopK(n - r, n) for r in ranks(n)}
    return st


def _gather(st, k, base, xs, p, ctx) -> None:
    imp = _importance(p)(base, xs[0])
    st["dtype"] = imp.dtype
    if st["mk"] is not None:
        st["mk"].add(imp.float())
    for sel in st["sel"].values():
        sel.update(imp)


def _end_pass(st, k) -> None:
    if st["mk"] is not None:
        st["mk"].advance()
        if k == 1:
            st["thr"] = mk_threshold(st["mk"].values, st["dtype"])
    elif k == 0:
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
    apply=lambda st, b, xs, w, p, ctx: _fuse(b, xs[0], _importance(p)(b, xs[0]), st["thr"], st),
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
    mergekit_defaults={"numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}
