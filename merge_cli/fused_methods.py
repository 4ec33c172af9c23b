"""How the engine runs linear, task_arithmetic and TIES through the fused kernels of fused.py.

Each function takes the raw inputs on the CPU (their own dtype) and the job's parameters, and returns the
output in the output dtype. TIES thresholds come from the exact selection in methods/selection.py; the index-ordered
tie rule becomes a flat-index cutoff the fused kernel can test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from merge_cli import fused
from merge_cli.methods import ParamSet
from merge_cli.methods.selection import SAMPLE, StreamingTopK, Threshold, bracket, finish_threshold

FUSED_METHODS = ("linear", "task_arithmetic", "ties")


def run_linear(base, xs, weights, p: ParamSet, out_dtype):
    divisor = float(sum(weights)) if p.normalize else 1.0
    return fused.linear(xs, [float(w) for w in weights], divisor, out_dtype)


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype):
    s = sum(weights)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    return fused.task_arithmetic(base, xs, [float(w) for w in weights], float(scale), out_dtype)


Chunks = Callable[[], Iterable[tuple[int, torch.Tensor, list[torch.Tensor]]]]
Region = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def select_thresholds(
    n: int, densities, samples: Callable[[int], torch.Tensor], chunks: Chunks, region: Region
) -> tuple[list[Threshold | None], list[int]]:
    """Per model i: the exact top-k threshold of |x_i - base| (k = int(density * n); None keeps all) and
    the flat-index cutoff of its tie quota (entries equal to the threshold are kept below it).

    The tensor is seen through `chunks()` ((flat offset, base, xs) in order: one whole chunk, or rows),
    `samples(i)` (a sample of |x_i - base| that brackets each threshold) and `region(i, g0, g1)` (base and
    x_i over the flat range [g0, g1)). One blocked pass counts, per model, the entries above the bracket
    and those inside it per block; with quantised bf16 deltas the bracket usually collapses onto the
    threshold value itself and the counts are the answer, else the in-band values are gathered. A bracket
    that misses (rare) costs a radix selection (two passes) and one more counting pass: always exact."""
    ts: list[Threshold | None] = []
    cuts = [n] * len(densities)
    todo: dict[int, tuple[float, float]] = {}
    for i, d in enumerate(densities):
        k = int(d * n)
        if d >= 1.0 or k >= n:
            ts.append(None)
        elif k <= 0:
            ts.append(Threshold(math.inf, 0, 0, 0))
        else:
            ts.append(None)
            todo[i] = bracket(samples(i), k, n)
    while todo:
        found = _count_pass(n, todo, densities, chunks)
        todo = {}
        for i, (t, blocks, cut) in found.items():
            k = int(densities[i] * n)
            if t is None:  # the bracket missed: radix-select the value, then count its ties
                value = _radix_value(i, k, n, chunks)
                todo[i] = (value, value)
                continue
            ts[i] = t
            if not t.keep_all_equal:
                cuts[i] = cut if cut is not None else _equal_cutoff(i, t, blocks, region)
    return ts, cuts


def _count_pass(n: int, todo: dict[int, tuple[float, float]], densities, chunks: Chunks) -> dict:
    acc = {i: [0, [], [], []] for i in todo}  # above, blocks (g0, g1, in-band), values, flat indices
    for offset, b, xs in chunks():
        for i, (lo, hi) in todo.items():
            above, per_block, vals, idxs = fused.band_counts(b, xs[i], lo, hi, gather=lo != hi)
            a = acc[i]
            a[0] += above
            size = b.numel()
            a[1] += [
                (offset + j * fused.BLOCK, offset + min(size, (j + 1) * fused.BLOCK), c)
                for j, c in enumerate(per_block)
            ]
            a[2] += vals
            a[3] += [ix + offset for ix in idxs]
    out = {}
    for i, (lo, hi) in todo.items():
        above, blocks, vals, idxs = acc[i]
        k = int(densities[i] * n)
        in_band = sum(c for _, _, c in blocks)
        if lo == hi:
            t = Threshold(lo, above, k - above, in_band) if above < k <= above + in_band else None
            out[i] = (t, blocks, None)
            continue
        cands = torch.cat(vals) if vals else torch.empty(0)
        t = finish_threshold(cands, above, k)
        cut = None
        if t is not None and not t.keep_all_equal:
            cut = int(torch.cat(idxs)[cands == t.value][t.take_equal - 1]) + 1
        out[i] = (t, blocks, cut)
    return out


def _equal_cutoff(i: int, t: Threshold, blocks, region: Region) -> int:
    """Flat index just past the take_equal-th entry equal to the threshold, from per-block counts."""
    seen = 0
    for g0, g1, c in blocks:
        if seen + c >= t.take_equal:
            b, x = region(i, g0, g1)
            return g0 + fused.nth_equal(b, x, t.value, t.take_equal - seen) + 1
        seen += c
    raise AssertionError("threshold-equal entries miscounted")


def _radix_value(i: int, k: int, n: int, chunks: Chunks) -> float:
    sel = StreamingTopK(k, n)
    for p in range(2):
        for _, b, xs in chunks():
            sel.update((xs[i].to(torch.float32) - b.to(torch.float32)).abs())
        if p == 0:
            sel.next_pass()
    return sel.result().value


def ties_thresholds(base, xs, densities) -> tuple[list[Threshold | None], list[int]]:
    """select_thresholds for whole tensors (samples: a fixed stride through the flat tensor)."""
    n = base.numel()
    fb = base.reshape(-1)
    step = max(1, n // SAMPLE)

    def samples(i: int) -> torch.Tensor:
        return (xs[i].reshape(-1)[::step].to(torch.float32) - fb[::step].to(torch.float32)).abs()

    def region(i: int, g0: int, g1: int):
        return fb[g0:g1], xs[i].reshape(-1)[g0:g1]

    return select_thresholds(n, densities, samples, lambda: [(0, base, xs)], region)


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
