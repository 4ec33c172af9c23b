"""Native CPU kernels (kernels.c), compiled at first use with the system C compiler and loaded with ctypes.

One pass over each 1024-element tile does what the eager kernels of merge_cli/kernels/blocked.py do in a dozen
passes over ~1 MB blocks: DARE's draws, the trims and bands, the sign election and the disjoint merge, and
the input/output dtype conversions. The results are bitwise equal to the eager and plain kernels (same IEEE
fp32 operations in the same order; compiled without FMA contraction or fast-math).

Compute dtypes: fp32, and bf16/fp16 with torch's per-op rounding (each op in fp32, rounded to the half
dtype; sums over models accumulated in fp32 and rounded once), bitwise the plain kernels in that dtype.
fp16 inputs, outputs and compute need a compiler that knows _Float16 (has_f16()).

The library is cached under `$MERGE_CLI_CACHE` (default `$XDG_CACHE_HOME/merge-cli`, else
`~/.cache/merge-cli`), keyed by the source, the flags, the compiler and the CPU; building it takes about
1.2 s of CPU, once, on a background thread (warm_up()) while the merge plans and reads. Without a working
C compiler (or with `MERGE_CLI_NATIVE=0`) `lib()` is None and the engine uses its eager kernels in fp32
(same numbers, slower) and the plain kernels in bf16/fp16. ctypes releases the GIL for each call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from merge_cli.kernels import blocked as fused

SOURCE = Path(__file__).with_name("kernels.c")
INCLUDED = [Path(__file__).with_name("della.c")]  # #included by kernels.c: part of the cache key
# -O2 plus -O3's dynamic vectorizer cost model and loop unswitching: the kernels run as fast as with -O3
# (measured) and build in 1.2 s of CPU instead of 2.9 s (a first run pays it once).
FLAGS = ["-O2", "-fvect-cost-model=dynamic", "-funswitch-loops", "-std=c11", "-fPIC", "-shared",
         "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]  # fmt: skip
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # fp16 only where has_f16()

# spec_t flags (kernels.c)
HI, TOP, DARE, NEG, MUL, DIV, DELLA = 1, 2, 4, 8, 16, 32, 64


class Spec(ctypes.Structure):
    """One model's sparsify steps (kernels.c spec_t)."""

    _fields_ = [
        ("flags", ctypes.c_int32),
        ("thr_hi", ctypes.c_float),
        ("thr_top", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("cut_hi", ctypes.c_int64),
        ("cut_top", ctypes.c_int64),
        ("k0", ctypes.c_uint32),
        ("k1", ctypes.c_uint32),
        ("bound", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("q", ctypes.c_void_p),
        ("q_off", ctypes.c_int64),
        ("qc", ctypes.c_float),
        ("tiny", ctypes.c_float),
    ]


_why: list[str] = []


def unavailable_reason() -> str | None:
    """Why the native kernels are not in use (None when they are, or have not been asked for yet)."""
    return _why[0] if _why else None


def _cache_dir() -> Path:
    root = os.environ.get("MERGE_CLI_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "merge-cli"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [x for x in text.splitlines() if x.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compile(cc: str, out: Path, flags: list[str]) -> str | None:
    """Build the library at `out` (atomically); the compiler's complaint when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(
            [cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
        )
        if r.returncode != 0:
            return (r.stderr or r.stdout).strip().splitlines()[-1:][0] if (r.stderr or r.stdout) else "failed"
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_build_lock = threading.Lock()
_resolved = threading.Event()
_started: list[threading.Thread] = []
build_seconds: list[float] = []  # how long the compiler ran in this process (first run on a machine)


def warm_up() -> None:
    """Resolve lib() on a background thread (the compiler runs as a subprocess, so the GIL is free): on a
    first run the build overlaps planning and the first reads instead of delaying the merge. Later lib()
    calls wait for it."""
    if not _started and not _resolved.is_set():
        t = threading.Thread(target=lib, name="merge-cli-native-build", daemon=True)
        _started.append(t)
        t.start()


def ready() -> bool:
    """Has lib() been resolved (loaded, or found unavailable) in this process?"""
    return _resolved.is_set()


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded kernels, built first if needed; None when they cannot be (the reason: unavailable_reason()).
    Thread-safe: a second caller waits for the first one's build."""
    with _build_lock:
        try:
            return _load()
        finally:
            _resolved.set()


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MERGE_CLI_NATIVE", "1") == "0":
        _why.append("disabled by MERGE_CLI_NATIVE=0")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        _why.append("no C compiler found (set CC)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _why.append(f"{cc}: {e}")
        return None
    err = None
    for extra in (["-march=native"], []):
        flags = FLAGS + extra
        key = hashlib.sha256(
            "\0".join(
                [
                    *(f.read_text() for f in (SOURCE, *INCLUDED)),
                    *flags,
                    version,
                    platform.machine(),
                    _cpu_id(),
                ]
            ).encode()
        ).hexdigest()[:20]
        path = _cache_dir() / f"kernels-{key}.so"
        if not path.exists():
            t0 = time.perf_counter()
            try:
                err = _compile(cc, path, flags)
                build_seconds.append(time.perf_counter() - t0)
            except OSError as e:  # cache directory not writable
                err = str(e)
            if err:
                continue
        try:
            return _bind(ctypes.CDLL(str(path)))
        except OSError as e:
            err = str(e)
    _why.append(f"building the native kernels failed: {err}")
    return None


def _bind(so: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, u32, f32, vp = ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p
    p64, pd = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_double)
    so.mk_uniform.argtypes = [vp, i64, i64, u32, u32]
    so.mk_uniform.restype = None
    so.mk_merge.argtypes = [i64, i64, vp, i32, i32, vp, vp, vp, vp, f32, i32, i32, i32, f32, vp, i32,
                            p64, p64, p64, pd, i32, i32]  # fmt: skip
    so.mk_merge.restype = ctypes.c_int
    so.mk_l1_sums.argtypes = [i64, i64, vp, i32, i32, vp, vp, vp, pd, i32]
    so.mk_l1_sums.restype = ctypes.c_int
    so.mk_band_counts.argtypes = [i64, vp, i32, vp, i32, f32, f32, i64, p64, p64, i32]
    so.mk_band_counts.restype = ctypes.c_int
    so.mk_band_hists.argtypes = [i64, vp, i32, vp, i32, i32, vp, vp, vp, p64, vp, i32]
    so.mk_band_hists.restype = ctypes.c_int
    so.mk_nth_equal.argtypes = [i64, vp, i32, vp, i32, f32, i64, p64, i32]
    so.mk_nth_equal.restype = ctypes.c_int64
    so.mk_della_q.argtypes = [i64, i64, i64, vp, i32, vp, i32, f32, f32, f32, i32, vp, u32, u32, pd, i32]
    so.mk_della_q.restype = ctypes.c_int
    so.mk_linear.argtypes = [i64, i32, vp, vp, vp, f32, vp, i32, i32]
    so.mk_linear.restype = ctypes.c_int
    so.mk_task_arith.argtypes = [i64, vp, i32, i32, vp, vp, vp, f32, vp, i32, pd]
    so.mk_task_arith.restype = None
    so.mk_task_arith_half.argtypes = [i64, vp, i32, i32, vp, vp, vp, f32, f32, vp, i32, pd, i32]
    so.mk_task_arith_half.restype = None
    so.mk_has_f16.argtypes = []
    so.mk_has_f16.restype = ctypes.c_int
    return so


def spec(steps) -> Spec | None:
    """One model's sparsify steps (fused.Trim, Band, KeepBelow, then maybe negate) as a Spec; None when the
    native kernels do not know them."""
    s = Spec()
    rest = list(steps)
    if rest and rest[-1] is fused.negate:
        s.flags |= NEG
        rest.pop()
    if len(rest) > 1:
        return None
    for st in rest:
        if isinstance(st, fused.Trim):
            s.flags |= HI
            s.thr_hi, s.cut_hi = st.thr, st.cutoff
        elif isinstance(st, fused.Band):
            s.flags |= TOP
            if st.hi is not None:
                s.flags |= HI
                s.thr_hi, s.cut_hi = st.hi.thr, st.hi.cutoff
            s.thr_top, s.cut_top = (st.top.thr, st.top.cutoff) if st.top is not None else (-1.0, 0)
        elif isinstance(st, fused.KeepBelow):
            d = st.draws
            if not hasattr(d, "bound") or (st.mul is not None and st.div is not None):
                return None
            s.flags |= DARE | (MUL if st.mul is not None else 0) | (DIV if st.div is not None else 0)
            s.k0, s.k1, s.bound = d.k0, d.k1, d.bound
            s.scale = st.mul if st.mul is not None else (st.div if st.div is not None else 1.0)
        elif hasattr(st, "to_spec"):  # a step that fills its own fields (kernels/della.py's DellaKeep)
            st.to_spec(s)
        else:
            return None
    return s


def has_f16() -> bool:
    """Were fp16 inputs, outputs and compute built in (the compiler knows _Float16)?"""
    so = lib()
    return so is not None and bool(so.mk_has_f16())


def dtype_ok(dtype: torch.dtype) -> bool:
    """Can the native kernels read, write or compute in this dtype?"""
    return dtype in DTYPES and (dtype != torch.float16 or has_f16())


def weights_in(w: list[float], cd: torch.dtype) -> list[float]:
    """The weights as the plain kernels multiply by them in compute dtype cd (torch.tensor(w, dtype=cd))."""
    return list(w) if cd == torch.float32 else [float(torch.tensor(x, dtype=cd)) for x in w]


def supports(*tensors: torch.Tensor) -> bool:
    """Can the native kernels take these tensors as they are (CPU, contiguous, fp32, bf16 or fp16)?"""
    return all(t.device.type == "cpu" and dtype_ok(t.dtype) and t.is_contiguous() for t in tensors)


def _ptrs(xs: list[torch.Tensor]):
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    codes = (ctypes.c_int32 * len(xs))(*[DTYPES[x.dtype] for x in xs])
    return ptrs, codes


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("native kernel: out of memory")


def uniform(n: int, start: int, k0: int, k1: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    lib().mk_uniform(out.data_ptr(), n, start, k0, k1)
    return out


def merge(
    base, xs, specs: list[Spec], w: list[float], lam: float, consensus: bool, weighted: bool, mean: bool,
    divisor: float, out_dtype: torch.dtype, offset: int = 0, cd: torch.dtype = torch.float32,
):  # fmt: skip
    """kernels.c mk_merge over whole flat tensors: (output, kept per model, touched, conflict, NaN/Inf
    counts of [base, *xs] (zeros), squared norm of each task vector). Raises fused.NonFinite when an input
    holds a NaN/Inf (a squared norm is then not finite). cd: the compute dtype; in bf16/fp16 every op is
    rounded as torch rounds it, the weights as the plain kernels round them (weights_in), and a mean's
    divisor is clamped to cd's smallest normal when every weight is positive (ties.disjoint_merge)."""
    m, n = len(xs), base.numel()
    out = torch.empty(base.shape, dtype=out_dtype)
    ptrs, codes = _ptrs(xs)
    kept = (ctypes.c_int64 * m)()
    touched, conflict = ctypes.c_int64(), ctypes.c_int64()
    sq = (ctypes.c_double * m)()
    _check(
        lib().mk_merge(
            n,
            offset,
            base.data_ptr(),
            DTYPES[base.dtype],
            m,
            ptrs,
            codes,
            (Spec * m)(*specs),
            (ctypes.c_float * m)(*weights_in(w, cd)),
            lam,
            int(consensus),
            int(weighted),
            int(mean),
            divisor,
            out.data_ptr(),
            DTYPES[out_dtype],
            kept,
            ctypes.byref(touched),
            ctypes.byref(conflict),
            sq,
            DTYPES[cd],
            int(all(x > 0 for x in w)),
        )  # fmt: skip
    )
    sq = list(sq)
    bad = fused._bad(sq, [base, *xs])
    if any(bad):  # as the eager kernels: the caller names the input (or merges with the plain kernels)
        raise fused.NonFinite
    return out, list(kept), touched.value, conflict.value, bad, sq


def loaded() -> ctypes.CDLL | None:
    """The kernels if they are built and loaded already, else None, without waiting for a build: for the
    kernels whose eager twin is as exact (linear, fp32 task arithmetic), so a first run never waits."""
    return lib() if ready() else None


def usable(out_dtype: torch.dtype, cd: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Are the kernels loaded (no waiting) and able to read these tensors, write out_dtype, compute in cd?"""
    return loaded() is not None and supports(*tensors) and dtype_ok(out_dtype) and dtype_ok(cd)


def linear(xs, w: list[float], divisor: float, out_dtype: torch.dtype, cd: torch.dtype = torch.float32):
    """kernels.c mk_linear: bitwise blocked.linear (sum_i w_i x_i / divisor). Returns (output, NaN/Inf
    count of each input)."""
    out = torch.empty(xs[0].shape, dtype=out_dtype)
    ptrs, codes = _ptrs(xs)
    m = len(xs)
    w32 = (ctypes.c_float * m)(*w)
    hit = lib().mk_linear(
        xs[0].numel(), m, ptrs, codes, w32, divisor, out.data_ptr(), DTYPES[out_dtype], DTYPES[cd]
    )
    return out, (fused.count_nonfinite(xs) if hit else [0] * m)


def task_arithmetic(base, xs, w: list[float], scale: float, out_dtype: torch.dtype):
    """kernels.c mk_task_arith: bitwise blocked.task_arithmetic in fp32 (base + scale * sum_i w_i (x_i -
    base)). Returns (output, NaN/Inf counts of [base, *xs], squared norm of each task vector)."""
    out = torch.empty(base.shape, dtype=out_dtype)
    ptrs, codes = _ptrs(xs)
    m = len(xs)
    sq = (ctypes.c_double * m)()
    lib().mk_task_arith(
        base.numel(), base.data_ptr(), DTYPES[base.dtype], m, ptrs, codes, (ctypes.c_float * m)(*w), scale,
        out.data_ptr(), DTYPES[out_dtype], sq,
    )  # fmt: skip
    sq = list(sq)
    return out, fused._bad(sq, [base, *xs]), sq


def task_arithmetic_half(base, xs, w: list[float], divisor: float, lam: float, out_dtype, cd):
    """kernels.c mk_task_arith_half: bitwise merge(..., consensus=False) with no sparsify steps in a half
    compute dtype (the plain kernel's task arithmetic there). Returns (output, NaN/Inf counts of [base,
    *xs], squared norm of each task vector); raises fused.NonFinite on a NaN/Inf input, as merge()."""
    out = torch.empty(base.shape, dtype=out_dtype)
    ptrs, codes = _ptrs(xs)
    m = len(xs)
    sq = (ctypes.c_double * m)()
    lib().mk_task_arith_half(
        base.numel(), base.data_ptr(), DTYPES[base.dtype], m, ptrs, codes, (ctypes.c_float * m)(*weights_in(w, cd)),
        divisor, lam, out.data_ptr(), DTYPES[out_dtype], sq, DTYPES[cd],
    )  # fmt: skip
    sq = list(sq)
    bad = fused._bad(sq, [base, *xs])
    if any(bad):
        raise fused.NonFinite
    return out, bad, sq


def l1_sums(base, xs, specs: list[Spec], offset: int = 0, cd=torch.float32) -> list[tuple[float, float]]:
    m = len(xs)
    ptrs, codes = _ptrs(xs)
    sums = (ctypes.c_double * (2 * m))()
    _check(
        lib().mk_l1_sums(
            base.numel(),
            offset,
            base.data_ptr(),
            DTYPES[base.dtype],
            m,
            ptrs,
            codes,
            (Spec * m)(*specs),
            sums,
            DTYPES[cd],
        )
    )
    return [(sums[2 * i], sums[2 * i + 1]) for i in range(m)]


TILE = 1024  # kernels.c's tile: band_counts' blocks must be multiples of it


def band_counts(base, x, lo: float, hi: float, block: int, cd=torch.float32) -> tuple[int, list[int]]:
    """(entries of |x - base| above hi, entries in [lo, hi] per block of `block` elements, a multiple of
    TILE); |x - base| computed in compute dtype cd."""
    n = base.numel()
    above = ctypes.c_int64()
    per = (ctypes.c_int64 * max(1, -(-n // block)))()
    _check(
        lib().mk_band_counts(
            n,
            base.data_ptr(),
            DTYPES[base.dtype],
            x.data_ptr(),
            DTYPES[x.dtype],
            lo,
            hi,
            block,
            ctypes.byref(above),
            per,
            DTYPES[cd],
        )  # fmt: skip
    )
    return above.value, list(per)[: -(-n // block)]


def _bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


UNSUPPORTED = object()


def narrow(pairs, lo: float, hi: float, k: int, cd=torch.float32):
    """narrow_many for one bracket."""
    got = narrow_many(pairs, [(lo, hi, k)], cd)
    return got if got is UNSUPPORTED else got[0]


def narrow_many(pairs, brackets: list[tuple[float, float, int]], cd=torch.float32):
    """One pass over (base, x) pieces that narrows each bracket [lo, hi] (0 <= lo <= hi < inf) of the k-th
    largest |x - base| (for the same x: |x - base| is computed once for all of them), from a histogram of
    the in-band entries by their float bits (non-negative floats order like their bits): at most 65536
    buckets, so a bracket spanning fewer floats resolves to the exact value (lo == hi: one bucket, a count).
    Per bracket: (value, entries above it, entries equal to it) when exact, a narrower bracket (lo, hi)
    otherwise, None when the k-th largest is not inside [lo, hi] (the bracket missed). UNSUPPORTED when a
    piece is not something the native kernels take (the caller gathers instead)."""
    nb = len(brackets)
    lo_b = [_bits(lo) for lo, _, _ in brackets]
    shifts = [max(0, (_bits(hi) - lb).bit_length() - 16) for (_, hi, _), lb in zip(brackets, lo_b)]
    hists = [
        torch.zeros(((_bits(hi) - lb) >> sh) + 1, dtype=torch.int64)
        for (_, hi, _), lb, sh in zip(brackets, lo_b, shifts)
    ]
    above = (ctypes.c_int64 * nb)()
    args = (
        nb,
        (ctypes.c_float * nb)(*[lo for lo, _, _ in brackets]),
        (ctypes.c_float * nb)(*[hi for _, hi, _ in brackets]),
        (ctypes.c_int32 * nb)(*shifts),
        above,
        (ctypes.c_void_p * nb)(*[h.data_ptr() for h in hists]),
        DTYPES[cd],
    )
    for base, x in pairs:
        if not supports(base, x):
            return UNSUPPORTED
        _check(lib().mk_band_hists(base.numel(), base.data_ptr(), DTYPES[base.dtype], x.data_ptr(),
                                   DTYPES[x.dtype], *args))  # fmt: skip
    return [
        _resolve(lo, hi, k, above[b], hists[b], shifts[b], lo_b[b]) for b, (lo, hi, k) in enumerate(brackets)
    ]


def _resolve(lo: float, hi: float, k: int, above: int, hist: torch.Tensor, shift: int, lo_b: int):
    """One bracket's answer from its histogram (see narrow_many)."""
    need = k - above
    from_top = hist.flip(0).cumsum(0)
    if need <= 0 or need > int(from_top[-1]):
        return None
    if lo == hi:
        return lo, above, int(hist[0])
    r = int(torch.searchsorted(from_top, need))  # buckets from the top before the one holding the k-th
    b = hist.numel() - 1 - r
    b_lo = lo_b + (b << shift)
    if shift == 0:
        return _float(b_lo), above + (int(from_top[r - 1]) if r else 0), int(hist[b])
    return _float(b_lo), _float(min(_bits(hi), b_lo + (1 << shift) - 1))


def nth_equal(pairs, v: float, nth: int, cd=torch.float32) -> int | None:
    """The flat index (over the pieces in order) of the nth (1-based) entry with |x - base| == v, reading
    only as far as it; None when there are fewer."""
    offset = 0
    for base, x in pairs:
        seen = ctypes.c_int64()
        n = base.numel()
        at = lib().mk_nth_equal(
            n, base.data_ptr(), DTYPES[base.dtype], x.data_ptr(), DTYPES[x.dtype], v, nth, ctypes.byref(seen),
            DTYPES[cd],
        )  # fmt: skip
        if at >= 0:
            return offset + at
        nth -= seen.value
        offset += n
    return None
