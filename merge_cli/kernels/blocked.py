"""Cache-blocked CPU kernels for the hot methods: linear, task_arithmetic and TIES.

An eager merge of a whole tensor makes a dozen passes over memory (convert, subtract, compare, mask, ...),
each allocating a tensor-sized temporary whose fresh pages must be faulted in. These kernels walk the flat
tensors in blocks of `BLOCK` elements (about 1 MB in fp32, so the block's working set stays in the CPU's
L2 cache), run the same chain of eager ops on each block into reused buffers, and write the output dtype
directly. Every element gets exactly the operations of the eager kernels, in the same order, so the
results are bitwise equal to them (tested, whole and chunked, with blocks small enough that the tie
cutoff of TIES falls inside a block). No compiler is involved: nothing to import or compile at start-up.

NaN/Inf inputs are detected from sums the kernels compute anyway (the output's sum for linear, each task
vector's squared norm otherwise): a non-finite input always makes those non-finite, and only then are
the inputs counted exactly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import torch

from merge_cli import finite

BLOCK = 1 << 18  # elements per block (tests lower it to exercise block boundaries)

_local = threading.local()  # each thread its own buffers (the reader thread runs DARE's L1 pass ahead)


def _buf(key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable flat buffer of BLOCK elements, private to the calling thread."""
    buffers = _local.__dict__.setdefault("buffers", {})
    t = buffers.get((key, dtype))
    if t is None or t.numel() != BLOCK:
        t = buffers[(key, dtype)] = torch.empty(BLOCK, dtype=dtype)
    return t


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, BLOCK):
        yield s, min(n, s + BLOCK)


def count_nonfinite(tensors: list[torch.Tensor]) -> list[int]:
    """NaN/Inf count of each tensor (only run when a kernel's sums say there is one)."""
    return [sum(finite.count_nonfinite(t)) for t in tensors]


def _bad(sums: list[float], tensors: list[torch.Tensor]) -> list[int]:
    """NaN/Inf counts of `tensors`: zeros when every sum the kernel made from them is finite (a NaN/Inf
    input always makes one non-finite), counted only otherwise."""
    return [0] * len(tensors) if all(map(math.isfinite, sums)) else count_nonfinite(tensors)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def linear(xs: list[torch.Tensor], w: list[float], divisor: float, out_dtype: torch.dtype):
    """sum_i w_i * x_i / divisor, in fp32, each product fused into its add (add_ with alpha is an fma on the
    CPU, as the plain kernel's addcmul). Returns (output, NaN/Inf count of each input)."""
    flat = [_flat(x) for x in xs]
    n = flat[0].numel()
    out = torch.empty(n, dtype=out_dtype)
    acc_b, tmp_b = _buf("acc"), _buf("t0")
    total = 0.0
    for s, e in _blocks(n):
        acc, tmp = acc_b[: e - s], tmp_b[: e - s]
        acc.copy_(flat[0][s:e]).mul_(w[0])
        for i in range(1, len(flat)):
            x = flat[i][s:e]  # bf16/fp16 widen exactly; a float64 input is rounded to fp32 first, as in prep
            acc.add_(tmp.copy_(x) if x.dtype == torch.float64 else x, alpha=w[i])
        total += float(acc.sum())  # a NaN/Inf input makes this non-finite
        if divisor != 1.0:
            acc.div_(divisor)
        out[s:e].copy_(acc)
    bad = _bad([total], xs)
    return out.reshape(xs[0].shape), bad


def task_arithmetic(base, xs: list[torch.Tensor], w: list[float], scale: float, out_dtype: torch.dtype):
    """base + scale * sum_i w_i * (x_i - base), in fp32. Returns (output, NaN/Inf counts of [base, *xs],
    squared norm of each task vector)."""
    fb, flat = _flat(base), [_flat(x) for x in xs]
    n = fb.numel()
    out = torch.empty(n, dtype=out_dtype)
    bb_b, acc_b, tmp_b = _buf("base"), _buf("acc"), _buf("t0")
    sq = [0.0] * len(xs)
    for s, e in _blocks(n):
        bb, acc, tmp = bb_b[: e - s], acc_b[: e - s], tmp_b[: e - s]
        bb.copy_(fb[s:e])
        for i in range(len(flat)):
            t = acc if i == 0 else tmp
            t.copy_(flat[i][s:e]).sub_(bb)
            sq[i] += float(torch.dot(t, t))
            t.mul_(w[i])
            if i:
                acc.add_(tmp)
        if scale != 1.0:
            acc.mul_(scale)
        out[s:e].copy_(acc.add_(bb))
    bad = _bad(sq, [base, *xs])
    return out.reshape(base.shape), bad, sq


def _below(thr: float) -> float:
    """The largest fp32 value below thr: |t| > _below(thr) is |t| >= thr."""
    t = torch.tensor(thr, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(-math.inf)))


class NonFinite(Exception):
    """A NaN/Inf reached a count: the caller names the input that holds it (or, when non-finite inputs are
    allowed, merges this tensor with the plain kernels)."""


def _int(v: torch.Tensor) -> int:
    f = float(v)
    if not math.isfinite(f):
        raise NonFinite
    return int(f)


def _count_sign(s: torch.Tensor) -> tuple[int, int]:
    """For s with entries in {-1, 0, 1}: (how many are 1, how many are -1); exact (integer fp32 sums)."""
    total, nonzero = _int(s.sum()), _int(torch.dot(s, s))
    return (nonzero + total) // 2, (nonzero - total) // 2


Sparsify = Callable[[torch.Tensor, int, int], None]  # (fp32 block of tau, flat start, flat end): in place


class Trim:
    """TIES trim: keep |t| > thr, and |t| == thr at flat index < cutoff (hardshrink off the cutoff block)."""

    def __init__(self, thr: float, cutoff: int):
        self.thr, self.cutoff, self.below = thr, cutoff, _below(thr)

    def __call__(self, t: torch.Tensor, g0: int, g1: int) -> None:
        thr, cutoff = self.thr, self.cutoff
        if cutoff >= g1:  # every threshold-equal entry of the block is kept
            t.copy_(torch.hardshrink(t, self.below, out=_buf("trim")[: t.numel()]))
        elif cutoff <= g0:  # none is
            t.copy_(torch.hardshrink(t, thr, out=_buf("trim")[: t.numel()]))
        else:  # the quota of equal entries ends inside this block
            a = t.abs()
            index = torch.arange(g0, g1, dtype=torch.int64)
            t.mul_((a > thr) | ((a == thr) & (index < cutoff)))


class Band:
    """Breadcrumbs band: the entries `hi` keeps minus those `top` keeps (t_hi - t_top: exact); None keeps
    every entry."""

    def __init__(self, hi: Trim | None, top: Trim | None):
        self.hi, self.top = hi, top

    def __call__(self, t: torch.Tensor, g0: int, g1: int) -> None:
        t_top = _buf("top")[: t.numel()].copy_(t)
        if self.top is not None:
            self.top(t_top, g0, g1)
        if self.hi is not None:
            self.hi(t, g0, g1)
        t.sub_(t_top)


class KeepBelow:
    """DARE: t * m with m = draws(g0, g1), the float 0/1 keep mask (u < density) of the block, then the
    rescale, as the plain kernel does: (t * m) * mul (L1 factor) or (t * m) / div (1 / keep probability).
    `draws` also carries its counter-hash key (k0, k1) and bound for the native kernels."""

    def __init__(self, draws, mul: float | None = None, div: float | None = None):
        self.draws, self.mul, self.div = draws, mul, div

    def __call__(self, t: torch.Tensor, g0: int, g1: int) -> None:
        t.mul_(self.draws(g0, g1))
        if self.mul is not None:
            t.mul_(self.mul)
        if self.div is not None:
            t.div_(self.div)


def negate(t: torch.Tensor, g0: int, g1: int) -> None:
    t.neg_()


def consensus(
    base, xs: list[torch.Tensor], sparsify: list[list[Sparsify]], offset: int, w: list[float], lam: float,
    weighted: bool, mean: bool, out_dtype: torch.dtype,
):  # fmt: skip
    """TIES election and disjoint merge of the sparsified task vectors: for each model, tau = x - base goes
    through its sparsify steps (trim, band, random drop, ...), then the elected sign (of sum_i w_i tau_i,
    or of sum_i tau_i unless weighted; 0 -> +) keeps the agreeing entries, merged as sum_i w_i tau_i over
    the agreeing ones (divided by sum_i w_i over them when mean; 0 -> 1). `offset`: the flat index of this
    chunk's first element. Returns (output, kept count per model, touched count, sign-conflict count,
    NaN/Inf counts of [base, *xs], squared norm of each task vector).

    Only float arithmetic on the hot path (bool masks are several times slower on CPU): masks are sign()
    values in {-1, 0, 1} and {0, 1}."""
    fb, flat = _flat(base), [_flat(x) for x in xs]
    n, m = fb.numel(), len(xs)
    out = torch.empty(n, dtype=out_dtype)
    bb_b, a_b, sgn_b, num_b, den_b, hi_b, lo_b = (
        _buf(k) for k in ("base", "abs", "sign", "num", "den", "smax", "smin")
    )
    ts_b = [_buf(f"t{i}") for i in range(m)]
    wt_b = [_buf(f"w{i}") for i in range(m)]
    sq = [0.0] * m
    kept = [0] * m
    touched = conflict = 0
    for s, e in _blocks(n):
        k = e - s
        bb, a, sgn, num, den = bb_b[:k], a_b[:k], sgn_b[:k], num_b[:k], den_b[:k]
        smax, smin = hi_b[:k], lo_b[:k]
        bb.copy_(fb[s:e])
        total = num  # the election's sum, before num accumulates the merge
        for i in range(m):
            t, wt = ts_b[i][:k], wt_b[i][:k]
            t.copy_(flat[i][s:e]).sub_(bb)
            sq[i] += float(torch.dot(t, t))
            for step in sparsify[i]:
                step(t, offset + s, offset + e)
            torch.sign(t, out=a)
            kept[i] += _int(torch.dot(a, a))  # nonzero entries
            torch.mul(t, w[i], out=wt)
            if i == 0:
                total.copy_(wt if weighted else t)
            else:
                total.add_(wt if weighted else t)
        torch.sign(total, out=sgn).add_(0.5).sign_()  # +1 where the sum is >= 0, else -1
        num.zero_()
        den.zero_()
        for i in range(m):
            t, wt = ts_b[i][:k], wt_b[i][:k]
            torch.mul(t, sgn, out=a).sign_()  # 1: agrees with the elected sign, -1: opposes it, 0: zero
            if i == 0:
                smax.copy_(a)
                smin.copy_(a)
            else:
                torch.maximum(smax, a, out=smax)
                torch.minimum(smin, a, out=smin)
            a.clamp_min_(0)
            num.addcmul_(wt, a)
            den.add_(a, alpha=w[i])
        touched += _count_sign(smax)[0]
        conflict += _count_sign(smin)[1]
        if mean:  # den == 0 -> 1
            den.add_(torch.abs(den, out=a).sign_().neg_().add_(1.0))
            num.div_(den)
        if lam != 1.0:
            num.mul_(lam)
        out[s:e].copy_(num.add_(bb))
    bad = _bad(sq, [base, *xs])
    return out.reshape(base.shape), kept, touched, conflict, bad, sq


def sparse_sum(
    base, xs: list[torch.Tensor], sparsify: list[list[Sparsify]], offset: int, w: list[float], lam: float,
    divisor: float, out_dtype: torch.dtype,
):  # fmt: skip
    """base + lam * (sum_i w_i sparsify_i(x_i - base)) / divisor, the no-consensus form (dare_linear,
    breadcrumbs). Returns (output, kept count per model, NaN/Inf counts of [base, *xs], squared norms)."""
    fb, flat = _flat(base), [_flat(x) for x in xs]
    n, m = fb.numel(), len(xs)
    out = torch.empty(n, dtype=out_dtype)
    bb_b, a_b, acc_b, t_b = _buf("base"), _buf("abs"), _buf("acc"), _buf("t0")
    sq = [0.0] * m
    kept = [0] * m
    for s, e in _blocks(n):
        k = e - s
        bb, a, acc, t = bb_b[:k], a_b[:k], acc_b[:k], t_b[:k]
        bb.copy_(fb[s:e])
        for i in range(m):
            t.copy_(flat[i][s:e]).sub_(bb)
            sq[i] += float(torch.dot(t, t))
            for step in sparsify[i]:
                step(t, offset + s, offset + e)
            kept[i] += _int(torch.dot(torch.sign(t, out=a), a))
            t.mul_(w[i])
            if i == 0:
                acc.copy_(t)
            else:
                acc.add_(t)
        if divisor != 1.0:
            acc.div_(divisor)
        if lam != 1.0:
            acc.mul_(lam)
        out[s:e].copy_(acc.add_(bb))
    bad = _bad(sq, [base, *xs])
    return out.reshape(base.shape), kept, bad, sq


def l1_sums(
    base, xs: list[torch.Tensor], sparsify: list[list[Sparsify]], offset: int
) -> list[tuple[float, float]]:
    """Per model: (||tau||_1, ||sparsify(tau)||_1) summed in float64, for the L1 rescale (one pass)."""
    fb, flat = _flat(base), [_flat(x) for x in xs]
    n = fb.numel()
    bb_b, t_b = _buf("base"), _buf("t0")
    sums = [[0.0, 0.0] for _ in xs]
    for s, e in _blocks(n):
        k = e - s
        bb, t = bb_b[:k], t_b[:k]
        bb.copy_(fb[s:e])
        for i in range(len(xs)):
            t.copy_(flat[i][s:e]).sub_(bb)
            sums[i][0] += float(torch.sum(t.abs(), dtype=torch.float64))
            for step in sparsify[i]:
                step(t, offset + s, offset + e)
            sums[i][1] += float(torch.sum(t.abs_(), dtype=torch.float64))
    return [(a, b) for a, b in sums]


def band_counts(base, x, lo: float, hi: float, gather: bool):
    """One blocked pass over |x - base|: how many entries lie above hi, how many lie in [lo, hi] in each
    block (for locating the tie cutoff), and, when gather, the in-band values and their flat indices."""
    fb, fx = _flat(base), _flat(x)
    n = fb.numel()
    bb_b, t_b, s_b = _buf("base"), _buf("t0"), _buf("sign")
    above = 0
    per_block: list[int] = []
    vals: list[torch.Tensor] = []
    idxs: list[torch.Tensor] = []
    for s, e in _blocks(n):
        k = e - s
        t, sg = t_b[:k], s_b[:k]
        t.copy_(fx[s:e]).sub_(bb_b[:k].copy_(fb[s:e])).abs_()
        a_hi, b_hi = _count_sign(torch.sub(t, hi, out=sg).sign_())
        if lo == hi:
            in_band = k - a_hi - b_hi
        else:
            in_band = k - a_hi - _count_sign(torch.sub(t, lo, out=sg).sign_())[1]
        above += a_hi
        per_block.append(in_band)
        if gather and in_band:
            i = torch.nonzero((t >= lo) & (t <= hi)).squeeze(1)
            vals.append(t[i])
            idxs.append(i + s)
    return above, per_block, vals, idxs


def nth_equal(base, x, value: float, nth: int) -> int:
    """Position of the nth (1-based) entry with |x - base| == value in these flat tensors."""
    a = (x.reshape(-1).to(torch.float32) - base.reshape(-1).to(torch.float32)).abs()
    return int(torch.nonzero(a == value).squeeze(1)[nth - 1])
