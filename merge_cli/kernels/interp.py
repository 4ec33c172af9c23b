"""Fast forms of slerp and nuslerp (methods/slerp.py) in every compute dtype, bitwise the plain kernels' output;
model_stock's are in kernels/stock.py.

The plain kernels make several full-size fp32/fp64 temporaries per tensor (casts, task vectors, products,
each term of the blend), and the page faults of those allocations cost more than the arithmetic. Here:

- the reductions that decide the coefficients (norms, dot products, cosines) are the plain kernels' own torch
  calls on tensors of the same shape, strides, dtype and values, so they give the same bits (torch reduces
  in an order fixed by those and by the thread count; the engine keeps the plain kernels' thread count for
  these methods). What they reduce (a task vector, a product) is written block by block into scratch
  buffers that are kept and reused from tensor to tensor (no fresh pages);
- the coefficients are computed by the same functions as the plain kernels (methods/slerp.py);
- the elementwise blend runs in blocks of ~1M entries, each block the plain kernel's ops in the same dtype
  and order on slices (an elementwise op gives the same bits on a slice), into the preallocated output.

Inputs arrive in their own dtype and are cast to the compute dtype `cd` as the plain path's prep does.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from merge_cli.methods import slerp as S

BLOCK = 1 << 20
KEEP = 64 << 20  # scratch buffers up to this size are kept for the next tensor, bigger ones freed after it
INTERP_METHODS = ("slerp", "nuslerp", "model_stock")  # served here and by kernels/stock.py
_local = threading.local()


def scratch(slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of this shape and dtype (its contents are garbage); one per slot and dtype, per thread."""
    n = math.prod(shape)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < n:
        bufs.pop((slot, dtype), None)  # free the smaller one first
        buf = bufs[(slot, dtype)] = torch.empty(max(n, 1), dtype=dtype)
    return buf[:n].view(tuple(shape))


def release(keep: int = 0) -> None:
    """Free this thread's scratch buffers of more than `keep` bytes (all of them by default)."""
    bufs = _local.__dict__.get("bufs", {})
    for k in [k for k, b in bufs.items() if b.numel() * b.element_size() > keep]:
        del bufs[k]


def in_cd(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return x if x.dtype == cd else x.to(cd)


def full_cd(x: torch.Tensor, cd: torch.dtype, slot: str) -> torch.Tensor:
    """x in the compute dtype (as the plain path's prep casts it), in scratch when a cast is needed."""
    return x if x.dtype == cd else scratch(slot, x.shape, cd).copy_(x)


def spans(n: int, step: int | None = None) -> list[tuple[int, int]]:
    step = step or BLOCK
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def widens(dtype: torch.dtype, cd: torch.dtype) -> bool:
    """Is every value of dtype exactly a value of cd (so torch may cast it as it reads, in a mixed op)?"""
    wider = {
        torch.float32: (torch.bfloat16, torch.float16),
        torch.float64: (torch.bfloat16, torch.float16, torch.float32),
    }
    return dtype == cd or dtype in wider.get(cd, ())


def subs_cd(xs, b: torch.Tensor, cd: torch.dtype, slots) -> list[torch.Tensor]:
    """Each x - b in the compute dtype (the plain kernels' task vectors), block by block into scratch, each
    block of b cast once."""
    outs = [scratch(s, x.shape, cd) for s, x in zip(slots, xs, strict=True)]
    bf = b.reshape(-1)
    for i, j in spans(bf.numel()):
        bb = in_cd(bf[i:j], cd)
        for x, o in zip(xs, outs, strict=True):
            xb = x.reshape(-1)[i:j]
            torch.sub(xb if widens(xb.dtype, cd) else xb.to(cd), bb, out=o.view(-1)[i:j])
    return outs


def sub_cd(x: torch.Tensor, b: torch.Tensor, cd: torch.dtype, slot: str) -> torch.Tensor:
    return subs_cd([x], b, cd, [slot])[0]


def prod_sum(
    x: torch.Tensor, y: torch.Tensor, dims, dtype: torch.dtype, slot: str, keep=True
) -> torch.Tensor:
    """(x.to(dtype) * y.to(dtype)).sum(dim=dims, keepdim=keep), the product made block by block in scratch
    (x, y contiguous, of the same shape): a block of x is cast into the buffer and multiplied in place by
    y, which torch casts as it reads (the same IEEE product, no cast copies)."""
    p = scratch(slot, x.shape, dtype)
    xf, yf, pf = x.reshape(-1), y.reshape(-1), p.view(-1)
    for i, j in spans(xf.numel()):
        if x.dtype == y.dtype == dtype:
            torch.mul(xf[i:j], yf[i:j], out=pf[i:j])
        else:
            pf[i:j].copy_(xf[i:j])
            pf[i:j].mul_(yf[i:j])
    return p.sum(dim=dims, keepdim=keep)


def sums(a: torch.Tensor, b: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """slerp.slerp_sums: (|a|^2, |b|^2, <a, b>) in float64 per mode, bitwise."""
    dims = S._dims(a, mode)
    return tuple(prod_sum(x, y, dims, torch.float64, "p64") for x, y in ((a, a), (b, b), (a, b)))


def view2(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The 2-D view the blend runs on: [1, n] (flat, or a 1-D tensor), [n / last, last] (each vector along the
    last dim a row) or [shape[0], rest] (vectors along dim 0 are columns)."""
    if mode == "flat" or x.dim() <= 1:
        return x.reshape(1, -1)
    if mode == "last":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(x.shape[0], -1)  # 'first' (per column) and 'rows' (one value per row)


def coef2(c: torch.Tensor, mode: str, like: torch.Tensor) -> torch.Tensor:
    """A per-vector coefficient (keepdim shape of the reduction) as a [rows or 1, cols or 1] tensor that
    broadcasts against view2(like, mode)."""
    if mode == "flat" or like.dim() <= 1 or c.numel() == 1:
        return c.reshape(1, 1)
    return c.reshape(-1, 1) if mode in ("last", "rows") else c.reshape(1, -1)


def tiles(rows: int, cols: int):
    """(r0, r1, c0, c1) blocks of about BLOCK entries covering a [rows, cols] view."""
    if cols >= BLOCK:
        for r in range(rows):
            for c0, c1 in spans(cols):
                yield r, r + 1, c0, c1
        return
    for r0, r1 in spans(rows, max(1, BLOCK // max(cols, 1))):
        yield r0, r1, 0, cols


def cut(c: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The part of a broadcasting [R or 1, C or 1] coefficient that meets the tile."""
    if c.shape[0] > 1:
        c = c[r0:r1]
    return c[:, c0:c1] if c.shape[1] > 1 else c


def blend(out: torch.Tensor, views, coefs, mode: str, fn) -> None:
    """out (viewed as view2) = fn(tile of each view, tile of each coefficient) for every tile."""
    o = view2(out, mode)
    vs = [view2(v, mode) if v is not None else None for v in views]
    for r0, r1, c0, c1 in tiles(*o.shape):
        parts = [v[r0:r1, c0:c1] if v is not None else None for v in vs]
        o[r0:r1, c0:c1] = fn(*parts, *(cut(c, r0, r1, c0, c1) for c in coefs))


def _sq(x: torch.Tensor) -> float:
    """Squared norm of a block, summed in fp32 by torch.dot (a statistic, not merged bits)."""
    f = x.reshape(-1).float()
    return float(torch.dot(f, f))


def sq_norms(xs, b: torch.Tensor, cd: torch.dtype) -> list[float]:
    """Squared norms of the task vectors x - b (in the compute dtype) for the report, block by block."""
    bf = b.reshape(-1)
    return [
        sum(_sq(in_cd(x.reshape(-1)[i:j], cd) - in_cd(bf[i:j], cd)) for i, j in spans(bf.numel())) for x in xs
    ]


def tau_sq(*taus: torch.Tensor) -> list[float]:
    """Squared norms of task vectors already in the compute dtype, block by block."""
    return [sum(_sq(x.reshape(-1)[i:j]) for i, j in spans(x.numel())) for x in taus]


def finite(*xs: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


# ---- slerp ---------------------------------------------------------------------------------------------


def slerp_mk_coefficients(t: float, a: torch.Tensor, b: torch.Tensor, cd: torch.dtype):
    """slerp.slerp_mergekit's coefficients: norms of per-2^20 chunk norms, the normalised dot, in fp32
    (fp64 for fp64); a, b in any dtype, each chunk cast to cd then to the work dtype. Also (|a|, |b|)."""
    work = S._mk_work(cd)
    widened = a.numel() * 4 <= KEEP  # huge tensors: cast each chunk as it is used (no full-size copy)
    a, b = a.reshape(1, -1), b.reshape(1, -1)
    if widened:
        a, b = wide(a, cd, work, "a32"), wide(b, cd, work, "b32")
    parts = spans(a.shape[1], S.MK_CHUNK)

    def chunk(x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return x[:, i:j] if widened else in_cd(x[:, i:j], cd).to(work)

    def norm(x: torch.Tensor) -> torch.Tensor:
        ps = [torch.linalg.vector_norm(chunk(x, i, j), dim=1, keepdim=True) for i, j in parts]
        return torch.linalg.vector_norm(torch.stack(ps), dim=0)

    def dot(na: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        ps = [((chunk(a, i, j) / na) * (chunk(b, i, j) / nb)).sum(dim=1, keepdim=True) for i, j in parts]
        return torch.stack(ps).sum(dim=0)

    na, nb = norm(a), norm(b)
    return S._mk_coefficients(t, na, nb, dot), (na, nb), (a, b, widened)


def wide(x: torch.Tensor, cd: torch.dtype, work: torch.dtype, slot: str) -> torch.Tensor:
    """x cast to cd and then to the work dtype (what the plain kernels' x.to(work) of an input in cd holds),
    made once, block by block, into scratch (x itself when it is already in the work dtype and cd)."""
    if x.dtype == cd == work:
        return x
    out = scratch(slot, x.shape, work)
    xf, of = x.reshape(-1), out.view(-1)
    for i, j in spans(xf.numel()):
        of[i:j] = in_cd(xf[i:j], cd)
    return out


def _combine(work: torch.dtype, cd: torch.dtype, widened: bool = False):
    """The plain kernels' blend (c0 a + c1 b in the work dtype, rounded to cd) for one tile; widened: a and b
    are already cd values in the work dtype."""
    if widened:
        return lambda a, b, c0, c1: (c0 * a + c1 * b).to(cd)
    return lambda a, b, c0, c1: (c0 * in_cd(a, cd).to(work) + c1 * in_cd(b, cd).to(work)).to(cd)


def run_slerp(base, xs, weights, p, out_dtype, stats: dict[str, Any], ctx, cd) -> torch.Tensor:
    a, b = base, xs[0]
    out = torch.empty(a.shape, dtype=out_dtype)
    mk = p.numerics == "mergekit"
    if mk:
        (c0, c1), norms, (a, b, mk) = slerp_mk_coefficients(p.t, a, b, cd)  # mk: a, b widened
        bad = not finite(*norms)
        work = S._mk_work(cd)
    else:
        aa, bb, ab = sums(full_cd(a, cd, "a"), full_cd(b, cd, "b"), "flat")
        bad = not finite(aa, bb)
        work = S.slerp_work(cd)
        c0, c1 = S.slerp_coefficients(p.t, aa, bb, ab, work)
    blend(out, (a, b), (coef2(c0, "flat", a), coef2(c1, "flat", a)), "flat", _combine(work, cd, mk))
    stats["_nonfinite"] = [int(bad), 0]
    stats["_sqnorms"] = sq_norms([b], a, cd)  # exact in cd: a, b hold cd values
    return out


def slerp_chunked(p, cd):
    """SLERP_STREAM's fast form: gather(st, base, xs) -> whether the chunk's sums are finite (None: not
    known), st the stream's state; apply(st, base, xs, weights, out_dtype, ctx) -> (output chunk, squared
    task-vector norms or None). Chunks in any dtype, cast to cd as the plain path's prep casts them."""

    def gather(st, b, xs) -> bool | None:
        s = sums(
            *(x if widens(x.dtype, cd) else full_cd(x, cd, k) for x, k in ((b, "a"), (xs[0], "b"))), "flat"
        )
        st["sums"] = s if st.get("sums") is None else tuple(x + y for x, y in zip(st["sums"], s, strict=True))
        return finite(s[0], s[1])

    def apply(st, b, xs, weights, out_dtype, ctx):
        if p.numerics == "mergekit":
            work = S._mk_work(cd)
            c0, c1 = S.mk_coefficients_from_sums(p.t, *st["sums"], work)
        else:
            work = S.slerp_work(cd)
            c0, c1 = S.slerp_coefficients(p.t, *st["sums"], work)
        out = torch.empty(b.shape, dtype=out_dtype)
        blend(out, (b, xs[0]), (coef2(c0, "flat", b), coef2(c1, "flat", b)), "flat", _combine(work, cd))
        return out, sq_norms(xs, b, cd)

    return gather, apply


# ---- nuslerp -------------------------------------------------------------------------------------------


def _vectors(base, xs, cd):
    """The two vectors nuslerp interpolates, in cd: the task vectors (scratch) or the inputs themselves."""
    if base is None:
        return full_cd(xs[0], cd, "a"), full_cd(xs[1], cd, "b")
    return sub_cd(xs[0], base, cd, "a"), sub_cd(xs[1], base, cd, "b")


def _mk_view(x: torch.Tensor, mode: str) -> torch.Tensor:
    """nuslerp_mergekit's view of a vector tensor (vectors along its last dim)."""
    if mode == "flat":
        return x.reshape(-1)
    return x.transpose(0, -1) if mode == "first" else x


def nuslerp_mk_cos(a: torch.Tensor, b: torch.Tensor, mode: str) -> tuple[torch.Tensor, bool]:
    """nuslerp_mergekit's cos (the view's shape, keepdim), bitwise, and whether the norms are finite."""
    va, vb = _mk_view(a, mode), _mk_view(b, mode)
    na = torch.norm(va, dim=-1, keepdim=True)
    nb = torch.norm(vb, dim=-1, keepdim=True)
    ua, ub = na.clamp(min=1e-7), nb.clamp(min=1e-7)
    # the product of the unit vectors in a's own layout, then the same sum over the same view
    prod = scratch("pcd", a.shape, a.dtype)
    ca, cb = _mk_coef(ua, mode, a), _mk_coef(ub, mode, a)
    blend(prod, (a, b), (ca, cb), mode, lambda x, y, u, v: (x / u) * (y / v))
    cos = _mk_view(prod, mode).sum(dim=-1, keepdim=True).clamp(-1, 1)
    return cos, finite(na, nb)


def _mk_coef(c: torch.Tensor, mode: str, like: torch.Tensor) -> torch.Tensor:
    """A per-vector value of nuslerp_mergekit's view (keepdim) as a coef2 of the original layout."""
    if mode == "first" and like.dim() >= 2:
        c = c.transpose(0, -1)
    return coef2(c, mode, like)


def _nu_mk_out(t: float, a, b, base, cos, mode: str, out: torch.Tensor, cd) -> None:
    """nuslerp_mergekit's blend (and + base) from cos, tile by tile into out."""
    colinear, s0, s1, s = S.nuslerp_mk_coefficients(t, cos)
    cs = [_mk_coef(c, mode, a) for c in (colinear, s0, s1, s)]

    every = bool(colinear.all()) if colinear.numel() else False
    some = bool(colinear.any())

    def fn(x, y, bb, col, c0, c1, sn):  # torch.where's pick, with only the branch(es) it picks from
        lerp = (1 - t) * x + t * y if some else None
        o = lerp if every else (c0 * x + c1 * y) / sn
        o = torch.where(col, lerp, o) if some and not every else o
        return o if bb is None else in_cd(bb, cd) + o

    blend(out, (a, b, base), cs, mode, fn)


def _nu_exact_out(t: float, a, b, base, sums_, mode: str, out: torch.Tensor, cd) -> None:
    """slerp_apply's blend (and + base) from the sums, tile by tile into out."""
    work = S.slerp_work(cd)
    c0, c1 = (coef2(c, mode, a) for c in S.slerp_coefficients(t, *sums_, work))
    comb = _combine(work, cd)

    def fn(x, y, bb, k0, k1):
        o = comb(x, y, k0, k1)
        return o if bb is None else in_cd(bb, cd) + o

    blend(out, (a, b, base), (c0, c1), mode, fn)


def run_nuslerp(base, xs, weights, p, out_dtype, stats: dict[str, Any], ctx, cd) -> torch.Tensor:
    t, mode = S.nuslerp_t(weights, p), S.nuslerp_mode(p)
    a, b = _vectors(base, xs, cd)
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    if S.mergekit_numerics(p):
        cos, ok = nuslerp_mk_cos(a, b, mode)
        _nu_mk_out(t, a, b, base, cos, mode, out, cd)
    else:
        s = sums(a, b, mode)
        ok = finite(s[0], s[1])
        _nu_exact_out(t, a, b, base, s, mode, out, cd)
    ctx.stats["t"] = t
    stats["_nonfinite"] = [int(not ok)] + [0] * (len(xs) - (base is None))
    if base is not None:
        stats["_sqnorms"] = tau_sq(a, b)
    return out


def nuslerp_chunked(p, cd):
    """NUSLERP_STREAM's fast form (see slerp_chunked)."""
    mode = S.nuslerp_mode(p)

    def gather(st, b, xs) -> bool | None:
        if mode == "last":
            return None  # nothing reduced here: the caller checks the chunk
        x0, x1 = _vectors(b, xs, cd)
        s = sums(x0, x1, mode)
        st["sums"] = s if st["sums"] is None else tuple(u + v for u, v in zip(st["sums"], s, strict=True))
        return finite(s[0], s[1])

    def apply(st, b, xs, weights, out_dtype, ctx):
        t = S.nuslerp_t(weights, p)
        x0, x1 = _vectors(b, xs, cd)
        out = torch.empty(xs[0].shape, dtype=out_dtype)
        if mode == "last" and S.mergekit_numerics(p):
            cos, _ = nuslerp_mk_cos(x0, x1, mode)
            _nu_mk_out(t, x0, x1, b, cos, mode, out, cd)
        else:
            s = sums(x0, x1, mode) if mode == "last" else st["sums"]
            _nu_exact_out(t, x0, x1, b, s, mode, out, cd)
        ctx.stats["t"] = t
        return out, (tau_sq(x0, x1) if b is not None else None)

    return gather, apply
