"""SCE (methods/sce.py) on the native kernels, bitwise the plain kernel in every compute dtype.

The plain kernel's slow steps are replaced, its cheap ones are called as they are:

- kernels.c mk_sce_prep makes the stacked task vectors tau_i = x_i - base in the compute dtype (the plain
  kernel's `stacked`) and their population variance over the models per element as torch's
  `var(dim=0, unbiased=False)` gives it on the CPU: Welford in double over the models in order, m2 / m,
  converted double -> float (-> bf16/fp16), in one pass over tiles instead of torch's per-element reduction;
- the top-k of the variance is an exact threshold, from a histogram of the variances' 16-bit patterns
  made in the same pass (bf16/fp16: one bin is one value; fp32: one more pass over the low 16 bits of
  the bin holding it): `numerics: exact` keeps the plain kernel's topk_mask positions (ties by lowest
  index, mask_from_threshold); `numerics: mergekit` takes torch.topk's set, which is
  `var >= threshold` unless the threshold is tied so that topk chooses among equal entries (the common
  case in bf16, whose variances take few values, and with bf16 inputs in fp32): then kernels.c
  mk_topk_set repeats torch.topk's selection steps (the C++ library's nth_element) on the same bits and
  keeps the same entries (checked once per process against torch.topk, which runs where it cannot);
- the weights are the plain kernel's own functions on the selected stack (sce.mergekit_weights, or float64
  sums of squares by sce._sq), so they are its bits;
- kernels.c mk_sce_erase does the sign election and the weighted disjoint merge with sce's denominator
  max(sum_i w_i [agree], cd(1e-6)), each op rounded to the compute dtype as torch rounds it.

Row-chunked tensors follow the plain streamed form (sce.STREAM: non-zero count, radix threshold with
lowest-index ties across chunks, float64 sums of squares per chunk, then the erase per chunk) on the
same state, with the variance and the erase native (SceChunks).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.kernels.route import F32, NoKernel
from merge_cli.methods import ParamSet
from merge_cli.methods.base import mergekit_numerics
from merge_cli.methods.sce import _end_pass, _energy_weights, _sq, mergekit_weights, topk_count
from merge_cli.methods.selection import StreamingTopK, Threshold, mask_from_threshold


@functools.cache
def _lib() -> ctypes.CDLL:
    so = native.lib()
    i64, i32, f32, vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
    pd, p64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)
    so.mk_sce_prep.argtypes = [i64, vp, i32, i32, vp, vp, vp, vp, pd, p64, i32]
    so.mk_sce_prep.restype = ctypes.c_int
    so.mk_sce_erase.argtypes = [i64, vp, i32, i32, vp, vp, f32, vp, i32, p64, i32]
    so.mk_sce_erase.restype = ctypes.c_int
    so.mk_topk_set.argtypes = [i64, vp, i32, i64, vp]
    so.mk_topk_set.restype = ctypes.c_int
    so.mk_sce_mask_sq.argtypes = [i64, i32, vp, vp, vp, i32]
    so.mk_sce_mask_sq.restype = None
    return so


def usable(base, xs, out_dtype=None) -> bool:
    """Can the native SCE kernels take these inputs (and write this output dtype)?"""
    ok = native.lib() is not None and native.supports(base, *xs)
    return ok and (out_dtype is None or native.dtype_ok(out_dtype))


_SCRATCH = threading.local()
SCRATCH_MAX = 1 << 26  # entries: larger working tensors (a whole embedding) are not kept between tensors


def _scratch(slot: str, shape, dtype) -> torch.Tensor:
    """An uninitialised working tensor, reused between tensors of the same thread (a fresh allocation of
    tens of MB costs more in page faults than the kernels that fill it)."""
    n = math.prod(shape)
    if n > SCRATCH_MAX:
        return torch.empty(shape, dtype=dtype)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(slot, dtype)] = torch.empty(max(n, 1 << 20), dtype=dtype)
    return buf[:n].view(shape)


def _rows(stack: torch.Tensor):
    return (ctypes.c_void_p * stack.shape[0])(*[stack[i].data_ptr() for i in range(stack.shape[0])])


def prep(base, xs, cd=F32, stack: bool = True, hist: torch.Tensor | None = None):
    """(the stacked task vectors [m, *shape] in cd, or None; their variance over the models in cd; the
    squared norm of each task vector; NaN/Inf counts of [base, *xs]). hist, when given (65536 int64),
    accumulates the variances' top-16-bit histogram. Raises fused.NonFinite when an input holds a NaN/Inf.
    The stack and the variance are this thread's scratch tensors: valid until its next call."""
    m = len(xs)
    stk = _scratch("stack", (m, *base.shape), cd) if stack else None
    var = _scratch("var", base.shape, cd)
    ptrs, codes = native._ptrs(xs)
    sq = (ctypes.c_double * m)()
    h = ctypes.cast(hist.data_ptr(), ctypes.POINTER(ctypes.c_int64)) if hist is not None else None
    native._check(
        _lib().mk_sce_prep(
            base.numel(),
            base.data_ptr(),
            native.DTYPES[base.dtype],
            m,
            ptrs,
            codes,
            _rows(stk) if stack else None,
            var.data_ptr(),
            sq,
            h,
            native.DTYPES[cd],
        )
    )
    sq = list(sq)
    bad = fused._bad(sq, [base, *xs])
    if any(bad):
        raise fused.NonFinite
    return stk, var, sq, bad


def new_hist() -> torch.Tensor:
    return torch.zeros(1 << 16, dtype=torch.int64)


def threshold(hist: torch.Tensor, k: int, cd, variances) -> Threshold:
    """The exact k-th largest variance (1 <= k < n) from prep's histogram: a bf16/fp16 bin is one value;
    in fp32 one more pass over `variances()` (the variance tensors in order) counts the low 16 bits of the
    entries in the bin that holds it (a radix select, as selection.StreamingTopK)."""
    b, above = StreamingTopK._locate(hist, k)
    if cd != F32:
        value = float(torch.tensor([b], dtype=torch.int16).view(cd))
        return Threshold(value, above, k - above, int(hist[b]))
    low = new_hist()
    for var in variances():
        bits = var.reshape(-1).view(torch.int32)
        low += torch.bincount((bits[(bits >> 16) == b] & 0xFFFF).to(torch.int64), minlength=1 << 16)
    lo, above_lo = StreamingTopK._locate(low, k - above)
    value = float(torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32))
    return Threshold(value, above + above_lo, k - above - above_lo, int(low[lo]))


def erase(base, stk: torch.Tensor, w: list[float], out_dtype, cd=F32) -> tuple[torch.Tensor, list[int]]:
    """sce._erase over the selected stack: (output in out_dtype, nonzero entries per model)."""
    m = stk.shape[0]
    out = torch.empty(base.shape, dtype=out_dtype)
    kept = (ctypes.c_int64 * m)()
    floor = float(torch.tensor(1e-6, dtype=cd))  # den.clamp_min(1e-6) in the compute dtype
    native._check(
        _lib().mk_sce_erase(
            base.numel(),
            base.data_ptr(),
            native.DTYPES[base.dtype],
            m,
            _rows(stk),
            (ctypes.c_float * m)(*native.weights_in(w, cd)),
            floor,
            out.data_ptr(),
            native.DTYPES[out_dtype],
            kept,
            native.DTYPES[cd],
        )
    )
    return out, list(kept)


def mask_sq(stk: torch.Tensor, keep: torch.Tensor | None, cd=F32, squares: bool = False):
    """stk *= keep (in place; keep None: all) and, when asked, the squares of the result in cd (the plain
    kernel's stacked * mask and .square(), in one pass)."""
    out = _scratch("squares", stk.shape, stk.dtype) if squares else None
    if keep is None and out is None:
        return None
    _lib().mk_sce_mask_sq(
        stk[0].numel(),
        stk.shape[0],
        _rows(stk),
        keep.data_ptr() if keep is not None else None,
        _rows(out) if out is not None else None,
        native.DTYPES[cd],
    )
    return out


def select(var: torch.Tensor, hist: torch.Tensor, k: int, mergekit: bool, cd=F32) -> torch.Tensor:
    """The positions the plain kernel keeps, as a mask: numerics: exact, topk_mask's (ties by lowest index)
    from the exact threshold; numerics: mergekit, torch.topk(|var|, k)'s: `var >= threshold` when every
    threshold-equal entry is kept (var >= 0), else topk_set (which of the equal entries torch.topk's
    selection steps keep)."""
    n = var.numel()
    if k <= 0 or k >= n:
        return torch.full(var.shape, k >= n, dtype=torch.bool)
    t = threshold(hist, k, cd, lambda: [var])
    if not mergekit:
        return mask_from_threshold(var, t)
    if t.keep_all_equal:
        return var >= t.value
    return topk_set(var, k)


def _torch_topk_set(v: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(v.shape, dtype=torch.bool)
    mask.view(-1)[torch.topk(v.abs().reshape(-1), k=k, largest=True, sorted=False).indices] = True
    return mask


def topk_set(v: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(|v|, k)'s positions (v >= 0, no NaN, 0 < k < n) as a mask: kernels.c mk_topk_set runs
    the same selection steps (the same set, several times faster) when this torch's topk agrees with it
    on a tied sample (checked once), else torch.topk itself (unsorted: the same set as sorted)."""
    n = v.numel()
    if k * 64 <= n or not _emulation_agrees():  # torch's partial-sort branch: its heap order, not ours
        return _torch_topk_set(v, k)
    keep = torch.empty(v.shape, dtype=torch.bool)
    rc = _lib().mk_topk_set(n, v.data_ptr(), native.DTYPES[v.dtype], k, keep.data_ptr())
    native._check(0 if rc >= 0 else rc)
    return keep if rc == 0 else _torch_topk_set(v, k)


@functools.cache
def _emulation_agrees() -> bool:
    g = torch.Generator().manual_seed(3)
    for n, levels in ((50_000, 40), (70_001, 3), (4_099, 1000)):
        v = torch.randint(0, levels, (n,), generator=g).float() * 0.25
        for k in (n // 60, n // 3, n - 5):
            keep = torch.empty(n, dtype=torch.bool)
            if _lib().mk_topk_set(n, v.data_ptr(), 0, k, keep.data_ptr()) != 0:
                return False
            if not torch.equal(keep, _torch_topk_set(v, k)):
                return False
    return True


MAX_MODELS = 16


def too_many(m: int) -> str | None:
    """Why m models stay on the plain kernel: torch sums more than 17 rows over dim 0 in groups of 16 (its
    cascade), not in the order the native erase adds them."""
    return f"sce with more than {MAX_MODELS} models has no fast path" if m > MAX_MODELS else None


def run_sce(base, xs, p: ParamSet, out_dtype, stats: dict, cd=F32) -> torch.Tensor | None:
    """One whole tensor through the native SCE kernels (raises NoKernel when they cannot read it; None,
    with stats['_plain_why'], for more models than the native erase adds in torch's order)."""
    if not usable(base, xs, out_dtype):
        raise NoKernel
    if too_many(len(xs)):
        stats["_plain_why"] = too_many(len(xs))
        return None
    mk = mergekit_numerics(p)
    topk = p.select_topk < 1.0
    hist = new_hist() if topk else None
    stk, var, sq, bad = prep(base, xs, cd, hist=hist)
    keep = None
    if topk:  # bf16/fp16: the zero variances are the histogram's bin 0 (+0; a variance is never -0)
        nz = var.numel() - int(hist[0]) if cd != F32 else None
        keep = select(var, hist, topk_count(var, p.select_topk, mk, nz), mk, cd)
    squares = mask_sq(stk, keep, cd, squares=mk)
    w = mergekit_weights(stk, squares) if mk else _energy_weights(_sq(stk), base.numel())
    out, kept = erase(base, stk, w, out_dtype, cd)
    stats["weights"] = w
    stats["kept_fraction"] = [k / max(base.numel(), 1) for k in kept]
    stats["_nonfinite"], stats["_sqnorms"] = bad, sq
    return out


class SceChunks:
    """The row-chunked form on the native kernels, on sce.STREAM's state (the engine's `state`): prepare()
    runs the statistics passes over the chunks, then apply() merges each chunk in order."""

    def __init__(self, state: dict, p: ParamSet, cd=F32):
        self.state, self.p, self.cd = state, p, cd

    def prepare(self, chunks) -> None:
        """chunks(): (offset, base, xs) raw, in row order. The engine's state is updated only on success (a
        NaN/Inf raises fused.NonFinite and leaves it for the plain streamed kernels)."""
        st = {**self.state, "sq": list(self.state["sq"]), "kept": list(self.state["kept"])}
        cd = self.cd

        def pieces():
            for _, b, xs in chunks():
                if not usable(b, xs):
                    raise NoKernel
                yield b, xs

        def variances(hist=None):
            return (prep(b, xs, cd, stack=False, hist=hist)[1] for b, xs in pieces())

        if self.p.select_topk < 1.0:  # pass 0: non-zero variances and their histogram
            hist = new_hist()
            st["nz"] = sum(int(torch.count_nonzero(v)) for v in variances(hist))
        _end_pass(st, 0)
        sel = st["sel"]
        if sel.radix is not None:  # the radix passes 1-2 of sce.STREAM: from the histogram (+ fp32 low bits)
            sel.thr = threshold(hist, sel.k, cd, variances)
        for b, xs in pieces():  # pass 3: float64 sums of squares of the selected entries
            stk, var, _, _ = prep(b, xs, cd)
            add = _sq(self._selected(st, stk, var))
            st["sq"] = [s + a for s, a in zip(st["sq"], add, strict=True)]
        _end_pass(st, 3)
        self.state.update(st)

    def _selected(self, st: dict, stk: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return stk if self.p.select_topk >= 1.0 else stk.mul_(st["sel"].mask(var).unsqueeze(0))

    def apply(self, base, xs, out_dtype):
        """(output chunk, NaN/Inf counts of [base, *xs], squared task-vector norms)."""
        st = self.state
        stk, var, sq, bad = prep(base, xs, self.cd)
        out, kept = erase(base, self._selected(st, stk, var), st["w"], out_dtype, self.cd)
        st["kept"] = [a + b for a, b in zip(st["kept"], kept, strict=True)]
        st["numel"] += base.numel()
        return out, bad, sq
