"""How the engine runs the blocked kernels of kernels/blocked.py: linear, task_arithmetic, TIES, dare_linear/dare_ties and
tensor-level breadcrumbs/breadcrumbs_ties.

Each function takes the raw inputs on the CPU (their own dtype) and the job's parameters, and returns the
output in the output dtype. What needs the whole tensor first (exact top-k thresholds, DARE's L1 factors) is
found through views of the tensor (whole, or row chunks); the index-ordered tie rule of the exact top-k
becomes a flat-index cutoff the kernels can test block by block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.methods import ParamSet
from merge_cli.methods.base import counter_uniform, draw_key, mergekit_numerics
from merge_cli.methods.selection import SAMPLE, StreamingTopK, Threshold, bracket, finish_threshold

FUSED_METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
)


def run_linear(base, xs, weights, p: ParamSet, out_dtype):
    from merge_cli.methods.linear import divisor as linear_divisor

    divisor = linear_divisor(weights, p, torch.float32) if p.normalize else 1.0
    return fused.linear(xs, [float(w) for w in weights], divisor, out_dtype)


def run_task_arithmetic(base, xs, weights, p: ParamSet, out_dtype):
    s = sum(weights)
    scale = p.lambda_ / (s if abs(s) >= 1e-8 else 1.0) if p.normalize else p.lambda_
    return fused.task_arithmetic(base, xs, [float(w) for w in weights], float(scale), out_dtype)


Chunks = Callable[[], Iterable[tuple[int, torch.Tensor, list[torch.Tensor]]]]
Region = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def counts_for(n: int, densities) -> list[int | None]:
    """TIES' top-k counts: None keeps everything (density >= 1), else int(density * n)."""
    return [None if d >= 1.0 or int(d * n) >= n else int(d * n) for d in densities]


def select_thresholds(
    n: int, ks: list[int | None], samples: Callable[[int], torch.Tensor], chunks: Chunks, region: Region,
    which: list[int] | None = None,
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
    passes) and one more counting pass: always exact."""
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
        found = _count_pass(n, todo, ks, which, chunks)
        todo = {}
        for j, res in found.items():
            if len(res) == 2:  # a narrower bracket (native histogram): again
                todo[j] = res
                continue
            t, blocks, cut = res
            if t is None:  # the bracket missed: radix-select the value, then count its ties
                value = _radix_value(which[j], ks[j], n, chunks)
                todo[j] = (value, value)
                continue
            ts[j] = t
            if not t.keep_all_equal:
                cuts[j] = cut if cut is not None else _equal_cutoff(which[j], t, blocks, region)
    return ts, cuts


def _count_pass(n: int, todo: dict[int, tuple[float, float]], ks, which, chunks: Chunks) -> dict:
    """Per selection j: (Threshold or None when the bracket missed, per-block in-band counts, tie cutoff or
    None), or, on the native kernels, a narrower bracket (lo, hi) to resolve again."""
    out: dict = {}
    if native.lib() is not None:  # wide brackets: a histogram pass narrows them instead of gathering values
        for j, (lo, hi) in list(todo.items()):
            if hi < math.inf:
                got = native.narrow(((b, xs[which[j]]) for _, b, xs in chunks()), max(lo, 0.0), hi, ks[j])
                if got is native.UNSUPPORTED:
                    continue
                if got is None or len(got) == 2:  # missed, or narrower
                    out[j] = got if got is not None else (None, [], None)
                    continue
                value, above, equal = got  # exact: the tie cutoff is found by reading up to it
                t = Threshold(value, above, ks[j] - above, equal)
                cut = None
                if not t.keep_all_equal:
                    pairs = ((b, xs[which[j]]) for _, b, xs in chunks())
                    cut = native.nth_equal(pairs, value, t.take_equal) + 1
                out[j] = (t, [], cut)
        todo = {j: v for j, v in todo.items() if j not in out}
    acc = {j: [0, [], [], []] for j in todo}  # above, blocks (g0, g1, in-band), values, flat indices
    for offset, b, xs in chunks() if todo else ():
        for j, (lo, hi) in todo.items():
            above, per_block, vals, idxs = _band_counts(b, xs[which[j]], lo, hi, lo != hi)
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


def _band_counts(b, x, lo: float, hi: float, gather: bool):
    """fused.band_counts; a pure count runs on the native kernels when they can take it."""
    if gather or fused.BLOCK % native.TILE or native.lib() is None or not native.supports(b, x):
        return fused.band_counts(b, x, lo, hi, gather)
    above, per_block = native.band_counts(b, x, lo, hi, fused.BLOCK)
    return above, per_block, [], []


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


def whole_views(base, xs):
    """(samples, chunks, region) of select_thresholds for whole tensors (samples: a fixed flat stride)."""
    n = base.numel()
    fb = base.reshape(-1)
    step = max(1, n // SAMPLE)

    @functools.cache  # breadcrumbs brackets two thresholds per model from one sample
    def samples(i: int) -> torch.Tensor:
        return (xs[i].reshape(-1)[::step].to(torch.float32) - fb[::step].to(torch.float32)).abs()

    def region(i: int, g0: int, g1: int):
        return fb[g0:g1], xs[i].reshape(-1)[g0:g1]

    return samples, (lambda: [(0, base, xs)]), region


def ties_thresholds(base, xs, densities) -> tuple[list[Threshold | None], list[int]]:
    return select_thresholds(base.numel(), counts_for(base.numel(), densities), *whole_views(base, xs))


def trims(thresholds, cutoffs) -> list[list[fused.Sparsify]]:
    return [[] if t is None else [fused.Trim(t.value, c)] for t, c in zip(thresholds, cutoffs)]


def _native(base, xs, steps, out_dtype) -> list[native.Spec] | None:
    """The native kernels' per-model specs for these steps, or None when they cannot run them (no
    compiler, or dtypes they do not take): the eager kernels of kernels/blocked.py run instead."""
    if native.lib() is None or not native.supports(base, *xs) or out_dtype not in native.DTYPES:
        return None
    specs = [native.spec(s) for s in steps]
    return None if any(s is None for s in specs) else specs


def consensus(base, xs, steps, offset, w, lam, weighted, mean, out_dtype):
    """fused.consensus, on the native kernels when they can run it (bitwise the same result)."""
    specs = _native(base, xs, steps, out_dtype)
    if specs is None:
        return fused.consensus(base, xs, steps, offset, w, lam, weighted, mean, out_dtype)
    return native.merge(base, xs, specs, w, lam, True, weighted, mean, 1.0, out_dtype, offset)


def sparse_sum(base, xs, steps, offset, w, lam, divisor, out_dtype):
    """fused.sparse_sum, on the native kernels when they can run it: (output, kept, NaN/Inf counts, norms)."""
    specs = _native(base, xs, steps, out_dtype)
    if specs is None:
        return fused.sparse_sum(base, xs, steps, offset, w, lam, divisor, out_dtype)
    out, kept, _, _, bad, sq = native.merge(
        base, xs, specs, w, lam, False, False, False, divisor, out_dtype, offset
    )
    return out, kept, bad, sq


def run_ties(base, xs, weights, p: ParamSet, out_dtype, steps, offset: int = 0):
    """TIES on a whole tensor or a chunk at flat `offset`, each model trimmed by its `steps` (trims())."""
    return consensus(
        base, xs, steps, offset, [float(w) for w in weights], float(p.lambda_),
        bool(p.weighted_election), p.merge_func == "mean", out_dtype,
    )  # fmt: skip


# -- the generalized task arithmetic family (gta.py): dare_*, breadcrumbs* ----------------------------
GTA_METHODS = ("dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


class Draws:
    """DARE's keep mask of model i as float32 0/1 over a flat range: u < density, with u the tensor's
    counter-hash draws (TensorCtx.uniform's), compared in float32 as the plain kernel does. k0, k1 and
    bound say the same to the native kernels: keep where (hash >> 8) < bound = ceil(density * 2^24)."""

    def __init__(self, ctx, i: int, density: float):
        self.k0, self.k1 = draw_key(ctx.seed, ctx.name, i)
        self.density = float(torch.tensor(density, dtype=torch.float32))
        self.bound = min(1 << 24, math.ceil(self.density * (1 << 24)))

    def __call__(self, g0: int, g1: int) -> torch.Tensor:
        return (counter_uniform(self.k0, self.k1, g0, g1 - g0) < self.density).to(torch.float32)


def gta_applies(method: str, p: ParamSet) -> bool:
    if method.startswith("dare_"):
        return getattr(p, "trim_density", 1.0) >= 1.0  # MergeLM's extra trim runs on the plain kernels
    return method.startswith("breadcrumbs") and p.granularity == "tensor"


def _dare_draws(p: ParamSet, ctx) -> dict[int, Draws]:
    """The keep-mask draws of each model that drops entries (density < 1)."""
    return {i: Draws(ctx, i, float(d)) for i, d in enumerate(p.density) if d < 1.0}


def _dare_l1_sums(base, xs, masks: dict[int, Draws], offset: int = 0) -> list[tuple[float, float]]:
    """Each model's (||tau||_1, ||m * tau||_1) over the piece at flat `offset` (the L1 factor is their ratio)."""
    steps = [[fused.KeepBelow(masks[i])] if i in masks else [] for i in range(len(xs))]
    return l1_sums(base, xs, steps, offset)


def predraw(method: str, p: ParamSet, base, xs, ctx) -> dict[str, Any] | None:
    """What a whole-tensor dare_* merge with `rescale: l1` needs before it can run, made on the reader
    thread ahead of the merge: each model's (||tau||_1, ||m * tau||_1), a pass of its own."""
    if not (method.startswith("dare_") and gta_applies(method, p)) or getattr(p, "rescale", "none") != "l1":
        return None
    return {"l1": _dare_l1_sums(base, xs, _dare_draws(p, ctx))}


def l1_sums(base, xs, steps, offset: int) -> list[tuple[float, float]]:
    """fused.l1_sums, on the native kernels when they can run it."""
    specs = _native(base, xs, steps, torch.float32)
    return (
        fused.l1_sums(base, xs, steps, offset) if specs is None else native.l1_sums(base, xs, specs, offset)
    )


def gta_sparsify(
    method: str, p: ParamSet, n: int, m: int, ctx, views, pre: dict[str, Any] | None = None
) -> list[list[fused.Sparsify]]:
    """Each model's sparsify steps for a tensor of n elements seen through views = (samples, chunks,
    region): DARE's seeded drop and rescale (the L1 factor takes one counting pass, unless `pre`, the
    reader's predraw, brings it), or Breadcrumbs' magnitude band (two exact selections per model, in one
    pass). Negative weights flip the task vector for the consensus (gta.combine's sign(w_i) tau_i with
    weight |w_i|)."""
    from merge_cli.methods.breadcrumbs import band_counts
    from merge_cli.methods.gta import l1_factor

    steps: list[list[fused.Sparsify]] = [[] for _ in range(m)]
    if method.startswith("dare_"):
        how = getattr(p, "rescale", "none")
        masks = _dare_draws(p, ctx)
        for i, mk in masks.items():
            d = float(p.density[i])
            steps[i] = [fused.KeepBelow(mk, div=d if how == "inv_p" and d > 0 else None)]
        if how == "l1":
            sums = (pre or {}).get("l1")
            if sums is None:
                sums = [[0.0, 0.0] for _ in range(m)]
                for offset, b, xs in views[1]():
                    for i, (a, c) in enumerate(_dare_l1_sums(b, xs, masks, offset)):
                        sums[i][0] += a
                        sums[i][1] += c
            for i, mk in masks.items():
                factor = l1_factor(*sums[i])
                if factor is not None:
                    steps[i] = [fused.KeepBelow(mk, mul=factor)]
    else:
        ks: list[int | None] = []
        which: list[int] = []
        for i in range(m):
            if p.density[i] < 1.0:
                k_hi, k_top = band_counts(n, p.density[i], p.gamma[i])
                ks += [k_hi if k_hi < n else None, k_top]
                which += [i, i]
        ts, cuts = select_thresholds(n, ks, *views, which=which)
        j = 0
        for i in range(m):
            if p.density[i] < 1.0:
                hi, top = (trims(ts[j : j + 2], cuts[j : j + 2]) + [[]])[:2]
                steps[i] = [fused.Band(*(x[0] if x else None for x in (hi, top)))]
                j += 2
    return steps


def run_gta(method: str, base, xs, weights, p: ParamSet, out_dtype, steps, offset: int = 0):
    """(output, kept per model, touched, conflict, NaN/Inf counts, squared norms) of a GTA-family chunk."""
    w = [float(x) for x in weights]
    if method.endswith("_ties"):
        flipped = [s + [fused.negate] if wi < 0 else s for s, wi in zip(steps, w)]
        return consensus(
            base,
            xs,
            flipped,
            offset,
            [abs(x) for x in w],
            float(p.lambda_),
            True,
            bool(p.normalize),
            out_dtype,
        )
    tot = sum(w)
    divisor = (tot if abs(tot) >= 1e-8 else 1.0) if p.normalize else 1.0
    out, kept, bad, sq = sparse_sum(base, xs, steps, offset, w, float(p.lambda_), divisor, out_dtype)
    return out, kept, None, None, bad, sq


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


def whole(method: str, base, xs, weights, p: ParamSet, out_dtype, stats: dict[str, Any], ctx=None, pre=None):
    """One whole tensor through its blocked kernel; None if the kernel does not apply. stats['_nonfinite']
    receives the NaN/Inf count of each input ([base] + xs when there is a base), stats['_sqnorms'] the
    squared norm of each task vector when there is a base, and the methods' own statistics. ctx: the
    tensor's TensorCtx (the seeded draws of dare_*); pre: what predraw made ahead (DARE's L1 sums)."""
    if not applies(method, p):
        return None
    if method == "linear":
        return _out(run_linear(base, xs, weights, p, out_dtype), stats)
    if method == "task_arithmetic":
        return _out(run_task_arithmetic(base, xs, weights, p, out_dtype), stats)
    if method == "ties":
        ts, cuts = ties_thresholds(base, xs, p.density)
        if mergekit_numerics(p) and any(
            (t is not None and not t.keep_all_equal)
            or 0 == int(d * base.numel()) < d * base.numel() < base.numel()
            for t, d in zip(ts, p.density)
        ):  # the sort would choose among threshold-equal entries (or keep one of none): the plain kernel
            return None
        res = run_ties(base, xs, weights, p, out_dtype, trims(ts, cuts))
        return _merge_stats(stats, res, base.numel())
    steps = gta_sparsify(method, p, base.numel(), len(xs), ctx, whole_views(base, xs), pre)
    return _merge_stats(stats, run_gta(method, base, xs, weights, p, out_dtype, steps), base.numel())
