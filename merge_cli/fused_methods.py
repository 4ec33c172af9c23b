"""How the engine runs linear, task_arithmetic and TIES through the fused kernels of fused.py.

Each function takes the raw inputs on the device (their own dtype), the job's parameters, and returns
the output in the output dtype, or None when the fused kernel is unavailable (the caller then runs the
eager kernel). TIES thresholds come from the exact selection in methods/selection.py; the index-ordered
tie rule becomes a flat-index cutoff the fused kernel can test.
"""

from __future__ import annotations

from typing import Any

import torch

from merge_cli import fused
from merge_cli.methods import ParamSet
from merge_cli.methods.selection import SAMPLE, Threshold, bracket, find_threshold, finish_threshold

FUSED_METHODS = ("linear", "task_arithmetic", "ties")


def _vec(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def run_linear(base, xs, weights, p: ParamSet, out_dtype):
    divisor = float(sum(weights)) if p.normalize else 1.0
    return fused.linear(
        xs, _vec(weights, xs[0].device), torch.tensor(divisor, device=xs[0].device), out_dtype
    )


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype):
    s = sum(weights)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    return fused.task_arithmetic(
        base, xs, _vec(weights, base.device), torch.tensor(scale, device=base.device), out_dtype
    )


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


def select(base, x, k: int) -> tuple[Threshold, int] | None:
    """The exact top-k threshold of |x - base| and the flat-index cutoff of its tie quota, with one fused
    pass: a strided sample brackets the threshold, the pass counts entries above the bracket and marks
    those inside it, and the marked positions give both the candidates and where the equal ones sit."""
    n = base.numel()
    fx, fb = x.reshape(-1), base.reshape(-1)
    step = max(1, n // SAMPLE)
    lo, hi = bracket((fx[::step].to(torch.float32) - fb[::step].to(torch.float32)).abs(), k, n)
    code = fused.band(base, x, torch.tensor(lo, device=x.device), torch.tensor(hi, device=x.device))
    if code is None:
        return None
    code = code.reshape(-1)
    above_hi = int((code == 2).sum())
    idx = torch.nonzero(code == 1).squeeze(1)
    cands = (fx[idx].to(torch.float32) - fb[idx].to(torch.float32)).abs()
    t = finish_threshold(cands, int(above_hi), k)
    if t is None:  # the bracket missed (rare): select on the whole tensor
        a = (fx.to(torch.float32) - fb.to(torch.float32)).abs()
        t = find_threshold(a, k)
        return t, cutoff(t, a, 0, 0, n)
    if t.keep_all_equal:
        return t, n
    return t, int(idx[cands == t.value][t.take_equal - 1]) + 1


def ties_thresholds(base, xs, densities) -> tuple[list[Threshold | None], list[int]] | None:
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
            if found is None:
                return None
            ts.append(found[0])
            cuts.append(found[1])
    return ts, cuts


def run_ties(base, xs, weights, p: ParamSet, out_dtype, thresholds, cutoffs, offset: int = 0):
    dev = base.device
    thr = _vec([(-1.0 if t is None else t.value) for t in thresholds], dev)
    res = fused.ties(
        base, xs, thr, torch.tensor(cutoffs, dtype=torch.int64, device=dev), torch.tensor(offset, device=dev),
        _vec(weights, dev), torch.tensor(p.lambda_, device=dev), bool(p.weighted_election),
        p.merge_func == "mean", out_dtype,
    )  # fmt: skip
    return res


def applies(method: str, p: ParamSet) -> bool:
    return method in ("linear", "task_arithmetic") or (method == "ties" and p.merge_func in ("mean", "sum"))


def _out(res, stats: dict[str, Any]):
    """Unpack (output, NaN/Inf counts of the inputs[, squared task-vector norms]) into stats['_nonfinite']
    and stats['_sqnorms']."""
    if res is None:
        return None
    out, bad, *sq = res
    stats["_nonfinite"] = bad.tolist()
    if sq:
        stats["_sqnorms"] = sq[0].tolist()
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
        sel = ties_thresholds(base, xs, p.density)
        if sel is None:
            return None
        res = run_ties(base, xs, weights, p, out_dtype, *sel)
        if res is None:
            return None
        out, kept, touched, conflict, bad, sq = res
        stats["_nonfinite"] = bad.tolist()
        stats["_sqnorms"] = sq.tolist()
        n = base.numel()
        stats["kept_fraction"] = [int(k) / n for k in kept]
        stats["sign_conflict_rate"] = int(conflict) / max(int(touched), 1)
        return out
    return None
