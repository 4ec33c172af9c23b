"""della and della_linear (MagPrune, then the GTA back half) on the native kernels, bitwise the plain kernel
of methods/della.py in every compute dtype.

Per model, kernels.c's mk_della_q (native/della.c) ranks |tau| within each row (stable: a counting or LSD
radix sort on the bits of |tau|, on a thread pool by pieces of whole rows) and turns each rank into the keep
probability q with torch's per-op rounding in the compute dtype; DellaKeep is the sparsify step that keeps u < q (the tensor's counter-hash draws, as
ctx.uniform) and rescales. The L1 sums of `rescale: l1` come from the same call (whole tensors) or from a
pass over the row chunks (chunked tensors: rows are whole within a chunk, so ranks are per chunk); then the
merge runs as dare_*'s does (gta.run_gta): sign election and disjoint mean for della, the sum for
della_linear. Needs the native kernels (choice.py sends della to the plain kernels without them).
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from merge_cli.kernels import native
from merge_cli.kernels.gta import run_gta
from merge_cli.kernels.route import F32, NoKernel
from merge_cli.methods import ParamSet
from merge_cli.methods.base import draw_key

DELLA_METHODS = ("della", "della_linear")


class DellaKeep:
    """The sparsify step of model i (native only): keep where u < q, q the per-entry keep probabilities
    (a float32 tensor over the flat range from q_off, or None: every entry qc), then `inv_p` tau / q where
    kept (+0 where dropped), else tau * keep times the L1 factor (mul) when there is one."""

    def __init__(self, key, q, q_off: int, qc: float, how: str, cd, mul: float | None = None):
        self.key, self.q, self.q_off, self.qc, self.how, self.mul = key, q, q_off, qc, how, mul
        self.tiny = float(torch.finfo(cd).tiny)

    def to_spec(self, s: native.Spec) -> None:
        s.flags |= native.DELLA
        if self.how == "inv_p":
            s.flags |= native.DIV
        elif self.mul is not None:
            s.flags |= native.MUL
            s.scale = self.mul
        s.k0, s.k1 = self.key
        s.q = self.q.data_ptr() if self.q is not None else None
        s.q_off, s.qc, s.tiny = self.q_off, self.qc, self.tiny


def row_len(t: torch.Tensor) -> int:
    """The row length keep_probability ranks over: 2-D rows, >= 3-D as [shape[0], -1], 1-D one row."""
    return t.numel() // t.shape[0] if t.dim() > 1 else t.numel()


def _consts(d: float, e: float, cd) -> tuple[float, float, float]:
    """(de, e2, qc): d - e as torch casts the scalar to cd, 2e as the fp32 scalar the product uses, and d
    as full_like(d) makes it in cd."""
    de = float(torch.tensor(d - e, dtype=torch.float64).to(cd))
    e2 = float(torch.tensor(2 * e, dtype=torch.float64).to(torch.float32))
    qc = float(torch.full((), d, dtype=cd))
    return de, e2, qc


PIECE = 1 << 18  # elements (whole rows) per task of the ranking pool


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Threads for the ranks: the heaviest part of della, split over the cores by pieces of whole rows
    (ctypes releases the GIL; every piece is independent, so the result does not depend on the split)."""
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="merge-cli-della")


def _piece(base, x, r0: int, r1: int, length: int, offset: int, c, ranked: bool, q, key, want_sums, cd):
    """mk_della_q over the flat range [r0, r1) of whole rows; the L1 sums of the piece (or None)."""
    sums = (ctypes.c_double * 2)()
    eb, ex = base.element_size(), x.element_size()
    rc = native.lib().mk_della_q(
        r1 - r0, length, offset + r0, base.data_ptr() + r0 * eb, native.DTYPES[base.dtype],
        x.data_ptr() + r0 * ex, native.DTYPES[x.dtype], c[0], c[1], c[2], int(ranked),
        q.data_ptr() + 4 * r0 if q is not None else None, key[0], key[1], sums if want_sums else None,
        native.DTYPES[cd],
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native kernel: out of memory")
    return (sums[0], sums[1]) if want_sums else None


def keep_qs(base, xs, p: ParamSet, ctx, offset: int, cd, want_q: bool, want_sums: bool):
    """{model i: (q or None, (||tau||_1, ||keep * tau||_1) or None, the constant q)} for each model that
    drops entries, over a piece of whole rows at flat `offset` (mk_della_q, in pieces on the pool)."""
    n, length = base.numel(), row_len(base)
    step = max(1, PIECE // max(length, 1)) * length
    jobs, out = [], {}
    for i in _dropping(p, n):
        d, e = p.density[i], p.epsilon[i]
        c = _consts(d, e, cd)
        ranked = e != 0.0 and length > 1
        q = torch.empty(n, dtype=torch.float32) if want_q and ranked else None
        key = draw_key(ctx.seed, ctx.name, i)
        args = [(base, xs[i], r0, min(n, r0 + step), length, offset, c, ranked, q, key, want_sums, cd)
                for r0 in range(0, n, step)]  # fmt: skip
        out[i] = (q, c[2])
        jobs.append((i, args))
    pieces = sum(len(a) for _, a in jobs)
    run = _pool().map if pieces > 1 else map
    flat = list(run(lambda a: _piece(*a), [a for _, args in jobs for a in args]))
    res, k = {}, 0
    for i, args in jobs:
        part = flat[k : k + len(args)]
        k += len(args)
        sums = (sum(s[0] for s in part), sum(s[1] for s in part)) if want_sums else None
        res[i] = (out[i][0], sums, out[i][1])
    return res


def _dropping(p: ParamSet, n: int) -> list[int]:
    return [i for i, d in enumerate(p.density) if d < 1.0] if n else []


def l1_sums(p: ParamSet, pieces, ctx, cd=F32) -> dict[int, list[float]]:
    """Each dropping model's (||tau||_1, ||keep * tau||_1) over the pieces (offset, base, xs) of whole rows."""
    sums: dict[int, list[float]] = {}
    for offset, b, xs in pieces:
        for i, (_, s, _) in keep_qs(b, xs, p, ctx, offset, cd, False, True).items():
            acc = sums.setdefault(i, [0.0, 0.0])
            acc[0] += s[0]
            acc[1] += s[1]
    return sums


def factors(p: ParamSet, sums: dict[int, list[float]]) -> dict[int, float | None]:
    from merge_cli.methods.gta import l1_factor

    return {i: l1_factor(*s) for i, s in sums.items()}


def chunk_factors(p: ParamSet, chunks, ctx, cd=F32) -> dict[int, float | None] | None:
    """The L1 factors of a chunked tensor (one pass over its row chunks), None unless `rescale: l1`."""
    if p.rescale != "l1":
        return None
    return factors(p, l1_sums(p, chunks(), ctx, cd))


def run_della(method: str, base, xs, weights, p: ParamSet, out_dtype, ctx, offset: int = 0, cd=F32, fac=None):
    """(output, kept per model, touched, conflict, NaN/Inf counts, squared norms) of a whole tensor or a
    piece of whole rows at flat `offset`; fac: the L1 factors found over the whole tensor (chunked), else
    computed here from this piece (a whole tensor)."""
    if not (native.supports(base, *xs) and native.dtype_ok(out_dtype) and native.dtype_ok(cd)):
        raise NoKernel
    how = p.rescale
    need_sums = how == "l1" and fac is None
    steps: list[list] = [[] for _ in xs]
    sums: dict[int, list[float]] = {}
    for i, (q, s, qc) in keep_qs(base, xs, p, ctx, offset, cd, True, need_sums).items():
        if s is not None:
            sums[i] = list(s)
        steps[i] = [DellaKeep(draw_key(ctx.seed, ctx.name, i), q, offset, qc, how, cd)]
    if how == "l1":
        fac = factors(p, sums) if fac is None else fac
        for i, st in enumerate(steps):
            if st:
                st[0].mul = fac.get(i)
    return _merge(method, base, xs, weights, p, out_dtype, steps, offset, cd)


MERGE_PIECE = 1 << 20  # elements per task of the merge on the pool


def _merge(method: str, base, xs, weights, p: ParamSet, out_dtype, steps, offset: int, cd):
    """run_gta, in flat pieces on the pool when the tensor is large (the merge is elementwise once q is
    known: the same bits; the counts add up, the squared norms too, in piece order)."""
    n = base.numel()
    if n < 2 * MERGE_PIECE:
        return run_gta(method, base, xs, weights, p, out_dtype, steps, offset, cd)
    fb, fx = base.reshape(-1), [x.reshape(-1) for x in xs]

    def piece(a: int):
        b = min(n, a + MERGE_PIECE)
        return run_gta(method, fb[a:b], [x[a:b] for x in fx], weights, p, out_dtype, steps, offset + a, cd)

    parts = list(_pool().map(piece, range(0, n, MERGE_PIECE)))
    out = torch.cat([r[0] for r in parts]).reshape(base.shape)
    m = len(xs)
    kept = [sum(r[1][i] for r in parts) for i in range(m)]
    touched = None if parts[0][2] is None else sum(r[2] for r in parts)
    conflict = None if parts[0][3] is None else sum(r[3] for r in parts)
    bad = [sum(r[4][i] for r in parts) for i in range(len(parts[0][4]))]
    sq = [sum(r[5][i] for r in parts) for i in range(m)]
    return out, kept, touched, conflict, bad, sq
