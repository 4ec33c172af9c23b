"""TIES on the blocked kernels: exact top-k thresholds per model found from views of the tensor (whole, or
row chunks: a sample bracket, then a native histogram pass or a blocked counting pass, a radix fallback),
the index-ordered tie rule turned into a flat-index cutoff, then one consensus pass (route.consensus)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.kernels.route import F32, consensus
from merge_cli.methods import ParamSet
from merge_cli.methods.selection import SAMPLE, StreamingTopK, Threshold, bracket, finish_threshold

Chunks = Callable[[], Iterable[tuple[int, torch.Tensor, list[torch.Tensor]]]]
Region = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def counts_for(n: int, densities) -> list[int | None]:
    """TIES' top-k counts: None keeps everything (density >= 1), else int(density * n)."""
    return [None if d >= 1.0 or int(d * n) >= n else int(d * n) for d in densities]


def select_thresholds(
    n: int, ks: list[int | None], samples: Callable[[int], torch.Tensor], chunks: Chunks, region: Region,
    which: list[int] | None = None, cd: torch.dtype = F32,
) -> tuple[list[Threshold | None], list[int]]:  # fmt: skip
    """Per selection j: the exact top-ks[j] threshold of |x - base| for x = xs[which[j]] (default: xs[j];
    None: keep all) and the flat-index cutoff of its tie quota (entries equal to the threshold are kept
    below it).

    The tensor is seen through `chunks()` ((flat offset, base, xs) in order: one whole chunk, or rows),
    `samples(i)` (a sample of |xs[i] - base| that brackets each threshold) and `region(i, g0, g1)` (base
    and xs[i] over the flat range [g0, g1)). On the native kernels, a histogram pass over the bracket's
    float bits (native.narrow) resolves it to the exact value with its counts (or, for a bracket spanning
    more than 65536 floats, to a bracket that narrow; one more pass then resolves that), and the tie cutoff
    is found by reading up to the take_equal-th equal entry (native.nth_equal). Otherwise one blocked
    pass counts, per selection, the entries above the bracket and those inside it per block; with quantised
    bf16 deltas the bracket usually collapses onto the threshold value itself and the counts are the
    answer, else the in-band values are gathered. A bracket that misses (rare) costs a radix selection (two
    passes) and one more counting pass: always exact. |x - base| is computed in compute dtype cd."""
    which = list(range(len(ks))) if which is None else which
    ts: list[Threshold | None] = []
    cuts = [n] * len(ks)
    todo: dict[int, tuple[float, float]] = {}
    for j, k in enumerate(ks):
        if k is None or k >= n:
            ts.append(None)
        elif k <= 0:
            ts.append(Threshold(math.inf, 0, 0, 0))
        else:
            ts.append(None)
            todo[j] = bracket(samples(which[j]), k, n)
    while todo:
        found = _count_pass(n, todo, ks, which, chunks, cd)
        todo = {}
        for j, res in found.items():
            if len(res) == 2:  # a narrower bracket (native histogram): again
                todo[j] = res
                continue
            t, blocks, cut = res
            if t is None:  # the bracket missed: radix-select the value, then count its ties
                value = _radix_value(which[j], ks[j], n, chunks, cd)
                todo[j] = (value, value)
                continue
            ts[j] = t
            if not t.keep_all_equal:
                cuts[j] = cut if cut is not None else _equal_cutoff(which[j], t, blocks, region, cd)
    return ts, cuts


def _count_pass(n: int, todo: dict[int, tuple[float, float]], ks, which, chunks: Chunks, cd=F32) -> dict:
    """Per selection j: (Threshold or None when the bracket missed, per-block in-band counts, tie cutoff or
    None), or, on the native kernels, a narrower bracket (lo, hi) to resolve again."""
    out: dict = {}
    if native.lib() is not None:  # wide brackets: a histogram pass narrows them instead of gathering values
        per_model: dict[int, list[int]] = {}  # one pass per model narrows all of its brackets
        for j, (_, hi) in todo.items():
            if hi < math.inf:
                per_model.setdefault(which[j], []).append(j)
        for i, js in per_model.items():
            pairs = ((b, xs[i]) for _, b, xs in chunks())
            found = native.narrow_many(pairs, [(max(todo[j][0], 0.0), todo[j][1], ks[j]) for j in js], cd)
            if found is native.UNSUPPORTED:
                continue
            for j, got in zip(js, found):
                if got is None or len(got) == 2:  # missed, or narrower
                    out[j] = got if got is not None else (None, [], None)
                    continue
                value, above, equal = got  # exact: the tie cutoff is found by reading up to it
                t = Threshold(value, above, ks[j] - above, equal)
                cut = None
                if not t.keep_all_equal:
                    pairs = ((b, xs[i]) for _, b, xs in chunks())
                    cut = native.nth_equal(pairs, value, t.take_equal, cd) + 1
                out[j] = (t, [], cut)
        todo = {j: v for j, v in todo.items() if j not in out}
    acc = {j: [0, [], [], []] for j in todo}  # above, blocks (g0, g1, in-band), values, flat indices
    for offset, b, xs in chunks() if todo else ():
        for j, (lo, hi) in todo.items():
            above, per_block, vals, idxs = _band_counts(b, xs[which[j]], lo, hi, lo != hi, cd)
            a = acc[j]
            a[0] += above
            size = b.numel()
            a[1] += [
                (offset + q * fused.BLOCK, offset + min(size, (q + 1) * fused.BLOCK), c)
                for q, c in enumerate(per_block)
            ]
            a[2] += vals
            a[3] += [ix + offset for ix in idxs]
    for j, (lo, hi) in todo.items():
        above, blocks, vals, idxs = acc[j]
        k = ks[j]
        in_band = sum(c for _, _, c in blocks)
        if lo == hi:
            t = Threshold(lo, above, k - above, in_band) if above < k <= above + in_band else None
            out[j] = (t, blocks, None)
            continue
        cands = torch.cat(vals) if vals else torch.empty(0)
        t = finish_threshold(cands, above, k)
        cut = None
        if t is not None and not t.keep_all_equal:
            cut = int(torch.cat(idxs)[cands == t.value][t.take_equal - 1]) + 1
        out[j] = (t, blocks, cut)
    return out


def _band_counts(b, x, lo: float, hi: float, gather: bool, cd=F32):
    """fused.band_counts; a pure count runs on the native kernels when they can take it."""
    if gather or fused.BLOCK % native.TILE or native.lib() is None or not native.supports(b, x):
        return fused.band_counts(b, x, lo, hi, gather, cd)
    above, per_block = native.band_counts(b, x, lo, hi, fused.BLOCK, cd)
    return above, per_block, [], []


def _equal_cutoff(i: int, t: Threshold, blocks, region: Region, cd=F32) -> int:
    """Flat index just past the take_equal-th entry equal to the threshold, from per-block counts."""
    seen = 0
    for g0, g1, c in blocks:
        if seen + c >= t.take_equal:
            b, x = region(i, g0, g1)
            return g0 + fused.nth_equal(b, x, t.value, t.take_equal - seen, cd) + 1
        seen += c
    raise AssertionError("threshold-equal entries miscounted")


def _radix_value(i: int, k: int, n: int, chunks: Chunks, cd=F32) -> float:
    sel = StreamingTopK(k, n)
    for p in range(2):
        for _, b, xs in chunks():
            sel.update(fused.abs_tau(xs[i], b, cd))
        if p == 0:
            sel.next_pass()
    return sel.result().value


def whole_views(base, xs, cd=F32):
    """(samples, chunks, region) of select_thresholds for whole tensors (samples: a fixed flat stride)."""
    n = base.numel()
    fb = base.reshape(-1)
    step = max(1, n // SAMPLE)

    @functools.cache  # breadcrumbs brackets two thresholds per model from one sample
    def samples(i: int) -> torch.Tensor:
        return fused.abs_tau(xs[i].reshape(-1)[::step], fb[::step], cd)

    def region(i: int, g0: int, g1: int):
        return fb[g0:g1], xs[i].reshape(-1)[g0:g1]

    return samples, (lambda: [(0, base, xs)]), region


def ties_thresholds(base, xs, densities, cd=F32) -> tuple[list[Threshold | None], list[int]]:
    n = base.numel()
    return select_thresholds(n, counts_for(n, densities), *whole_views(base, xs, cd), cd=cd)


def trims(thresholds, cutoffs) -> list[list[fused.Sparsify]]:
    return [[] if t is None else [fused.Trim(t.value, c)] for t, c in zip(thresholds, cutoffs)]


def run_ties(base, xs, weights, p: ParamSet, out_dtype, steps, offset: int = 0, cd=F32):
    """TIES on a whole tensor or a chunk at flat `offset`, each model trimmed by its `steps` (trims())."""
    return consensus(
        base, xs, steps, offset, [float(w) for w in weights], float(p.lambda_),
        bool(p.weighted_election), p.merge_func == "mean", out_dtype, cd,
    )  # fmt: skip
