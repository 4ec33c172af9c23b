"""How the engine runs linear, task_arithmetic and TIES through the fused kernels of fused.py.

Each function takes the raw inputs on the CPU (their own dtype) and the job's parameters, and returns the
output in the output dtype. TIES thresholds come from the exact selection in methods/selection.py; the index-ordered
tie rule becomes a flat-index cutoff the fused kernel can test.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_cli import fused
from merge_cli.methods import ParamSet
from merge_cli.methods.selection import SAMPLE, Threshold, bracket, find_threshold, finish_threshold

FUSED_METHODS = ("linear", "task_arithmetic", "ties")


def run_linear(base, xs, weights, p: ParamSet, out_dtype):
    divisor = float(sum(weights)) if p.normalize else 1.0
    return fused.linear(xs, [float(w) for w in weights], divisor, out_dtype)


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype):
    s = sum(weights)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    return fused.task_arithmetic(base, xs, [float(w) for w in weights], float(scale), out_dtype)


def cutoff(t: Threshold | None, a: torch.Tensor | None, seen: int, offset: int, n: int) -> int:
    """Flat index below which threshold-equal entries are kept, for a block [offset, offset + n) in which
    `seen` equal entries came before. a: the block's |tau| (needed only when the quota splits the block)."""
    if t is None or t.keep_all_equal:
        return offset + n
    quota = t.take_equal - seen
    if quota <= 0:
        return offset
    equal_at = torch.nonzero(a.reshape(-1) == t.value).squeeze(1)
    if quota >= equal_at.numel():
        return offset + n
    return offset + int(equal_at[quota - 1]) + 1


def select(base, x, k: int) -> tuple[Threshold, int]:
    """The exact top-k threshold of |x - base| and the flat-index cutoff of its tie quota. A strided
    sample brackets the threshold; one blocked pass counts the entries above the bracket and those inside
    it per block, gathering the in-band values only when the bracket is a real interval (with quantised
    bf16 deltas it usually collapses onto the threshold value itself, and the counts are the answer)."""
    n = base.numel()
    fx, fb = x.reshape(-1), base.reshape(-1)
    step = max(1, n // SAMPLE)
    lo, hi = bracket((fx[::step].to(torch.float32) - fb[::step].to(torch.float32)).abs(), k, n)
    above_hi, per_block, vals, idxs = fused.band_counts(base, x, lo, hi, gather=lo != hi)
    in_band = sum(per_block)
    if lo == hi and above_hi < k <= above_hi + in_band:
        t = Threshold(lo, above_hi, k - above_hi, in_band)
        if t.keep_all_equal:
            return t, n
        return t, fused.equal_position(base, x, lo, per_block, t.take_equal)
    t = None
    if lo != hi:
        cands = torch.cat(vals) if vals else torch.empty(0)
        t = finish_threshold(cands, above_hi, k)
    if t is None:  # the bracket missed (rare): select on the whole tensor
        a = (fx.to(torch.float32) - fb.to(torch.float32)).abs()
        t = find_threshold(a, k)
        return t, cutoff(t, a, 0, 0, n)
    if t.keep_all_equal:
        return t, n
    idx = torch.cat(idxs)
    return t, int(idx[cands == t.value][t.take_equal - 1]) + 1


def ties_thresholds(base, xs, densities) -> tuple[list[Threshold | None], list[int]]:
    """Per model: None (keep everything) or the exact top-k threshold of |x - base|, and the tie cutoffs."""
    ts: list[Threshold | None] = []
    cuts: list[int] = []
    n = base.numel()
    for x, d in zip(xs, densities):
        k = int(d * n)
        if d >= 1.0 or k >= n:
            ts.append(None)
            cuts.append(n)
        elif k <= 0:
            ts.append(Threshold(float("inf"), 0, 0, 0))
            cuts.append(n)
        else:
            found = select(base, x, k)
            ts.append(found[0])
            cuts.append(found[1])
    return ts, cuts


def run_ties(base, xs, weights, p: ParamSet, out_dtype, thresholds, cutoffs, offset: int = 0):
    return fused.ties(
        base, xs, [None if t is None else t.value for t in thresholds], list(cutoffs), offset,
        [float(w) for w in weights], float(p.lambda_), bool(p.weighted_election), p.merge_func == "mean",
        out_dtype,
    )  # fmt: skip


def applies(method: str, p: ParamSet) -> bool:
    return method in ("linear", "task_arithmetic") or (method == "ties" and p.merge_func in ("mean", "sum"))


def _out(res, stats: dict[str, Any]):
    """Unpack (output, NaN/Inf counts of the inputs[, squared task-vector norms]) into stats['_nonfinite']
    and stats['_sqnorms']."""
    out, bad, *sq = res
    stats["_nonfinite"] = bad
    if sq:
        stats["_sqnorms"] = sq[0]
    return out


def whole(method: str, base, xs, weights, p: ParamSet, out_dtype, stats: dict[str, Any]):
    """One whole tensor through its fused kernel; None if the kernel is unavailable or does not apply.
    stats['_nonfinite'] receives the NaN/Inf count of each input ([base] + xs when there is a base), and
    stats['_sqnorms'] the squared norm of each task vector when there is a base."""
    if method == "linear":
        return _out(run_linear(base, xs, weights, p, out_dtype), stats)
    if method == "task_arithmetic":
        return _out(run_task_arithmetic(base, xs, weights, p, out_dtype), stats)
    if method == "ties" and p.merge_func in ("mean", "sum"):
        out, kept, touched, conflict, bad, sq = run_ties(
            base, xs, weights, p, out_dtype, *ties_thresholds(base, xs, p.density)
        )
        stats["_nonfinite"] = bad
        stats["_sqnorms"] = sq
        n = base.numel()
        stats["kept_fraction"] = [k / n for k in kept]
        stats["sign_conflict_rate"] = conflict / max(touched, 1)
        return out
    return None
