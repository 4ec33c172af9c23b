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
from merge_cli.methods.selection import Threshold, find_threshold

FUSED_METHODS = ("linear", "task_arithmetic", "ties")


def _vec(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def run_linear(base, xs, weights, p: ParamSet, out_dtype):
    divisor = float(sum(weights)) if p.normalize else 1.0
    return fused.linear(xs, _vec(weights, xs[0].device), torch.tensor(divisor, device=xs[0].device), out_dtype)


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype):
    s = sum(weights)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    return fused.task_arithmetic(base, xs, _vec(weights, base.device), torch.tensor(scale, device=base.device), out_dtype)


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


def ties_thresholds(base, xs, densities) -> list[Threshold | None]:
    """Per model: None (keep everything), or the exact top-k threshold of |x - base|."""
    out: list[Threshold | None] = []
    n = base.numel()
    b = base.to(torch.float32)
    for x, d in zip(xs, densities):
        k = int(d * n)
        if d >= 1.0 or k >= n:
            out.append(None)
        elif k <= 0:
            out.append(Threshold(float("inf"), 0, 0, 0))
        else:
            out.append(find_threshold((x.to(torch.float32) - b).abs(), k))
    return out


def run_ties(base, xs, weights, p: ParamSet, out_dtype, thresholds, cutoffs, offset: int = 0):
    dev = base.device
    thr = _vec([(-1.0 if t is None else t.value) for t in thresholds], dev)
    res = fused.ties(
        base, xs, thr, torch.tensor(cutoffs, dtype=torch.int64, device=dev), torch.tensor(offset, device=dev),
        _vec(weights, dev), torch.tensor(p.lambda_, device=dev), bool(p.weighted_election),
        p.merge_func == "mean", out_dtype,
    )  # fmt: skip
    return res


def whole(method: str, base, xs, weights, p: ParamSet, out_dtype, stats: dict[str, Any]):
    """One whole tensor through its fused kernel; None if the kernel is unavailable or does not apply."""
    if method == "linear":
        return run_linear(base, xs, weights, p, out_dtype)
    if method == "task_arithmetic":
        return run_task_arithmetic(base, xs, weights, p, out_dtype)
    if method == "ties" and p.merge_func in ("mean", "sum"):
        ts = ties_thresholds(base, xs, p.density)
        b = base.to(torch.float32)
        cuts = [cutoff(t, None if t is None or t.keep_all_equal else (x.to(torch.float32) - b).abs(), 0, 0, base.numel()) for t, x in zip(ts, xs)]
        res = run_ties(base, xs, weights, p, out_dtype, ts, cuts)
        if res is None:
            return None
        out, kept, touched, conflict = res
        n = base.numel()
        stats["kept_fraction"] = [int(k) / n for k in kept]
        stats["sign_conflict_rate"] = int(conflict) / max(int(touched), 1)
        return out
    return None
