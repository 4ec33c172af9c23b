"""The one dispatch table of the fast kernels: FUSED_METHODS, `applies` (does a fast kernel serve these
parameters) and `whole` (one tensor through its method's blocked runner), plus the runners of linear and
task_arithmetic. TIES is in ties.py, dare_* and breadcrumbs* in gta.py, della* in della.py, slerp/nuslerp
in interp.py, model_stock in stock.py and sce in sce.py, the native-or-eager choice per primitive and the
dtypes served in route.py; kernels/choice.py says why a merge stays on the plain kernels.

Each runner takes the raw inputs on the CPU (their own dtype) and the job's parameters, and returns the
output in the output dtype; `cd` is the compute dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.kernels.della import DELLA_METHODS, run_della
from merge_cli.kernels.gta import GTA_METHODS, gta_applies, gta_sparsify, run_gta
from merge_cli.kernels.interp import (
    INTERP_METHODS,
    KEEP,
    nuslerp_chunked,
    release,
    run_nuslerp,
    run_slerp,
    slerp_chunked,
)
from merge_cli.kernels.route import F32, NoKernel, fast_path
from merge_cli.kernels.sce import run_sce
from merge_cli.kernels.stock import run_model_stock, stock_chunked
from merge_cli.kernels.ties import (
    run_ties,
    ties_thresholds,
    trims,
    whole_views,
)
from merge_cli.methods import METHODS, ParamSet
from merge_cli.methods.base import TensorCtx, mergekit_numerics

FUSED_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    *INTERP_METHODS,
    "sce",
)


def run_linear(base, xs, weights, p: ParamSet, out_dtype, cd=F32):
    from merge_cli.methods.linear import divisor as linear_divisor

    divisor = linear_divisor(weights, p, torch.float32) if p.normalize else 1.0
    w = [float(x) for x in weights]
    if native.usable(out_dtype, cd, *xs):  # bitwise the eager kernel; never waits for a first build
        return native.linear(xs, w, float(divisor), out_dtype, cd)
    return fused.linear(xs, w, divisor, out_dtype, cd)


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype, cd=F32):
    s = sum(weights)
    w = [float(x) for x in weights]
    if cd != F32:  # the plain order in a half dtype: delta rounded, divided, times lambda, plus base
        divisor = (s if abs(s) >= 1e-8 else 1.0) if p.normalize else 1.0
        return native.task_arithmetic_half(base, xs, w, float(divisor), float(p.lambda_), out_dtype, cd)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    if native.usable(out_dtype, cd, base, *xs):  # bitwise the eager kernel; never waits for a first build
        return native.task_arithmetic(base, xs, w, float(scale), out_dtype)
    return fused.task_arithmetic(base, xs, w, float(scale), out_dtype)


def _out(res, stats: dict[str, Any]):
    """Unpack (output, NaN/Inf counts of the inputs[, squared task-vector norms]) into stats['_nonfinite']
    and stats['_sqnorms']."""
    out, bad, *sq = res
    stats["_nonfinite"] = bad
    if sq:
        stats["_sqnorms"] = sq[0]
    return out


def _merge_stats(stats: dict[str, Any], res, n: int) -> torch.Tensor:
    out, kept, touched, conflict, bad, sq = res
    stats["_nonfinite"] = bad
    stats["_sqnorms"] = sq
    stats["kept_fraction"] = [k / n for k in kept]
    if touched is not None:
        stats["sign_conflict_rate"] = conflict / max(touched, 1)
    return out


def applies(method: str, p: ParamSet) -> bool:
    if method == "ties":
        return p.merge_func in ("mean", "sum")
    if method in GTA_METHODS:  # breadcrumbs with mergekit's sorted band: the plain kernels
        return gta_applies(method, p) and not (method.startswith("breadcrumbs") and mergekit_numerics(p))
    return method in FUSED_METHODS


def whole(
    method: str, base, xs, weights, p: ParamSet, out_dtype, stats: dict[str, Any], ctx=None, pre=None, cd=F32
):  # fmt: skip
    """One whole tensor through its blocked kernel; None if the kernel does not apply. stats['_nonfinite']
    receives the NaN/Inf count of each input ([base] + xs when there is a base), stats['_sqnorms'] the
    squared norm of each task vector when there is a base, and the methods' own statistics. ctx: the
    tensor's TensorCtx (the seeded draws of dare_*); pre: what predraw made ahead (DARE's L1 sums); cd: the
    compute dtype. In bf16/fp16, raises NoKernel when the native kernels cannot take the inputs."""
    if not applies(method, p) or fast_path([method], cd) is not None:
        return None
    if method == "linear":
        return _out(run_linear(base, xs, weights, p, out_dtype, cd), stats)
    if method in INTERP_METHODS:  # eager blocked torch in any dtype (kernels/interp.py)
        return run_interp(method, base, xs, weights, p, out_dtype, stats, ctx, cd)
    if method == "sce":
        return run_sce(base, xs, p, out_dtype, stats, cd)
    if cd != F32 and not (native.supports(base, *xs) and native.dtype_ok(out_dtype)):
        raise NoKernel
    if method == "task_arithmetic":
        return _out(run_task_arithmetic(base, xs, weights, p, out_dtype, cd), stats)
    if method == "ties":
        ts, cuts = ties_thresholds(base, xs, p.density, cd)
        if mergekit_numerics(p) and any(
            (t is not None and not t.keep_all_equal)
            or 0 == int(d * base.numel()) < d * base.numel() < base.numel()
            for t, d in zip(ts, p.density)
        ):  # the sort would choose among threshold-equal entries (or keep one of none): the plain kernel
            return None
        res = run_ties(base, xs, weights, p, out_dtype, trims(ts, cuts), 0, cd)
        return _merge_stats(stats, res, base.numel())
    if method in DELLA_METHODS:
        res = run_della(method, base, xs, weights, p, out_dtype, ctx, 0, cd)
        return _merge_stats(stats, res, base.numel())
    views = whole_views(base, xs, cd)
    steps = gta_sparsify(method, p, base.numel(), len(xs), ctx, views, pre, cd)
    return _merge_stats(stats, run_gta(method, base, xs, weights, p, out_dtype, steps, 0, cd), base.numel())


INTERP_RUN = {"slerp": run_slerp, "nuslerp": run_nuslerp, "model_stock": run_model_stock}


def run_interp(method: str, base, xs, weights, p, out_dtype, stats: dict[str, Any], ctx, cd) -> torch.Tensor:
    """One whole tensor of slerp, nuslerp or model_stock (kernels/interp.py, kernels/stock.py)."""
    ctx = ctx if ctx is not None else TensorCtx(name="")
    if any(x.numel() == 0 for x in xs):  # nothing to block: the plain kernel
        b = base.to(cd) if base is not None else None
        out = METHODS[method].kernel(b, [x.to(cd) for x in xs], list(weights), p, ctx).to(out_dtype)
    else:
        out = INTERP_RUN[method](base, xs, weights, p, out_dtype, stats, ctx, cd)
        release(KEEP)
    stats.update(ctx.stats)
    return out


def interp_chunked(method: str, p: ParamSet, cd):
    """(gather, apply) of slerp's, nuslerp's or model_stock's row-chunked fast form (interp.slerp_chunked)."""
    return {"slerp": slerp_chunked, "nuslerp": nuslerp_chunked, "model_stock": stock_chunked}[method](p, cd)
