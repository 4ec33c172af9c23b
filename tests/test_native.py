"""The native kernels (merge_cli/kernels/native): built with the system C compiler, bitwise equal to the eager
kernels of merge_cli/kernels/blocked.py, and optional (no compiler: the eager kernels run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kernel_steps import sparsify_steps
from method_helpers import counter_draw

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.methods import base as mbase

needs_native = pytest.mark.skipif(
    native.lib() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


def _numpy_uniform(monkeypatch, k0, k1, start, n):
    monkeypatch.setattr(native, "lib", lambda: None)
    u = mbase.counter_uniform(k0, k1, start, n)
    monkeypatch.undo()
    return u


@needs_native
@pytest.mark.parametrize("start", [0, 5, (1 << 32) - 3, 3 << 33])
def test_draws_agree_in_c_numpy_and_plain_python(monkeypatch, start):
    """The counter hash gives the same bits in C, in numpy (the fallback) and in plain Python integers
    (counter_draw, written from the contract), across the 2^32 boundary of the counter too."""
    k0, k1 = 0x9ABCDEF0, 0x12345678
    c = native.uniform(4100, start, k0, k1)
    py = _numpy_uniform(monkeypatch, k0, k1, start, 4100)
    assert torch.equal(c, py)
    for j in (0, 1, 2, 1023, 1024, 4099):
        assert float(c[j]) == counter_draw(k0, k1, start + j)
    # any sub-range draws the same values as the whole range (chunking does not change draws)
    assert torch.equal(native.uniform(100, start + 777, k0, k1), c[777:877])


@pytest.mark.parametrize("start", [0, 5, (1 << 32) - 3, 3 << 33])
def test_device_draws_agree_with_the_cpu_hash(monkeypatch, start):
    """The torch-integer form of the hash (what the CUDA path runs, here on the CPU) gives the same bits
    as counter_uniform and as the plain-Python reference, across the 2^32 boundary too."""
    k0, k1 = 0xFFFFFFFF, 0x80000001  # all-ones and high-bit keys exercise the 32-bit wrap-around
    d = mbase.counter_uniform_on(k0, k1, start, 3000, torch.device("cpu"))
    assert d.dtype == torch.float32
    assert torch.equal(d, mbase.counter_uniform(k0, k1, start, 3000))
    for j in (0, 1, 2, 1999, 2999):
        assert float(d[j]) == counter_draw(k0, k1, start + j)
    # made in pieces (small ones here): the same draws as in one piece
    monkeypatch.setattr(mbase, "_DRAW_PIECE", 7)
    assert torch.equal(mbase.counter_uniform_on(k0, k1, start, 3000, torch.device("cpu")), d)


@pytest.mark.gpu
def test_cuda_draws_are_the_cpu_draws():
    ctx = mbase.TensorCtx(name="model.layers.1.mlp.up_proj.weight", seed=9, offset=1 << 20)
    cpu = ctx.uniform(2, (300, 70))
    ctx.device = torch.device("cuda")
    gpu = ctx.uniform(2, (300, 70))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


@needs_native
def test_draws_look_uniform_and_independent():
    """A quick sanity check of the hash as a generator: mean, variance, neighbour correlation, and the
    kept fraction at a DARE density stay within a few standard errors."""
    n = 1 << 20
    u = native.uniform(n, 0, 7, 11).double()
    se = 1 / math.sqrt(12 * n)
    assert abs(float(u.mean()) - 0.5) < 5 * se
    assert abs(float(u.var()) - 1 / 12) < 5 * 0.0745 / math.sqrt(n)
    corr = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(n)
    kept = float((u < 0.3).double().mean())
    assert abs(kept - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    # different keys give unrelated streams
    v = native.uniform(n, 0, 8, 11).double()
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 5 / math.sqrt(n)


class _Ctx:
    seed, name = 3, "model.layers.0.mlp.up_proj.weight"


def _inputs(dtype, n=10_000, m=3, quantised=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    xs = []
    for _ in range(m):
        step = (
            2.0**-6 * torch.randint(-3, 4, (n,), generator=g).float()
            if quantised
            else 0.01 * torch.randn(n, generator=g)
        )
        xs.append((base.float() + step).to(dtype))
    return base, xs


@needs_native
@pytest.mark.parametrize("kind", ["none", "trim", "band", "dare"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("quantised", [True, False])
def test_native_merge_is_bitwise_equal_to_the_eager_kernels(kind, dtype, out_dtype, quantised):
    """Consensus (weighted or not, mean or sum, lambda) and the plain weighted sum, at a non-zero flat offset
    and over a length that is no multiple of the tile: the same output bits and the same counts."""
    base, xs = _inputs(dtype, quantised=quantised)
    steps = sparsify_steps(kind, base, xs, _Ctx)
    specs = [native.spec(s) for s in steps]
    w = [0.7, 1.3, 0.4]
    for offset in (0, 4096 + 17):
        for weighted, mean, lam in ((True, True, 1.0), (False, False, 0.8), (True, False, 1.0)):
            ref = fused.consensus(base, xs, steps, offset, w, lam, weighted, mean, out_dtype)
            got = native.merge(base, xs, specs, w, lam, True, weighted, mean, 1.0, out_dtype, offset)
            assert torch.equal(ref[0], got[0]), (offset, weighted, mean)
            assert (ref[0].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32) ==
                    got[0].view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32)).all()  # fmt: skip
            assert ref[1:4] == got[1:4]  # kept per model, touched, conflict
            assert got[5] == pytest.approx(ref[5], rel=1e-5)  # squared norms
        ref = fused.sparse_sum(base, xs, steps, offset, w, 0.9, 2.4, out_dtype)
        got = native.merge(base, xs, specs, w, 0.9, False, False, False, 2.4, out_dtype, offset)
        assert torch.equal(ref[0], got[0]) and ref[1] == got[1]


@needs_native
def test_trim_cutoff_inside_a_tile_keeps_exactly_the_quota():
    """A tie quota that ends mid-tile: entries equal to the threshold are kept before the cutoff only."""
    base = torch.zeros(5000)
    x = torch.full((5000,), 0.5)
    x[::2] = 0.25
    steps = [[fused.Trim(0.5, 1500)]]
    got = native.merge(base, [x], [native.spec(steps[0])], [1.0], 1.0, True, True, True, 1.0, torch.float32)[
        0
    ]
    expect = torch.where((torch.arange(5000) < 1500) & (x == 0.5), x, torch.zeros(()))
    assert torch.equal(got, expect)


@needs_native
def test_native_l1_sums_and_counts_match_eager():
    base, xs = _inputs(torch.bfloat16, n=70_000)
    steps = sparsify_steps("dare", base, xs, _Ctx)
    specs = [native.spec(s) for s in steps]
    for (a, b), (c, d) in zip(fused.l1_sums(base, xs, steps, 0), native.l1_sums(base, xs, specs, 0)):
        assert c == pytest.approx(a, rel=1e-9) and d == pytest.approx(b, rel=1e-9)
    block = 4 * native.TILE
    old = fused.BLOCK
    try:
        fused.BLOCK = block
        for lo, hi in ((2.0**-6, 2.0**-6), (2.0**-6, 3 * 2.0**-6), (0.0, 0.0)):
            above, per_block, _, _ = fused.band_counts(base, xs[0], lo, hi, gather=False)
            assert native.band_counts(base, xs[0], lo, hi, block) == (above, per_block)
    finally:
        fused.BLOCK = old


@needs_native
def test_nan_input_raises_nonfinite():
    base, xs = _inputs(torch.float32)
    xs[1][123] = float("nan")
    specs = [native.spec([]) for _ in xs]
    with pytest.raises(fused.NonFinite):
        native.merge(base, xs, specs, [1.0] * 3, 1.0, True, True, True, 1.0, torch.float32)


def test_unknown_steps_and_dtypes_fall_back():
    """What the native kernels cannot take is left to the eager ones: a float64 input (fp16 only where
    the compiler knows _Float16), an unknown step, two trims in a row."""
    assert not native.supports(torch.zeros(3, dtype=torch.float64))
    assert native.supports(torch.zeros(3, dtype=torch.float16)) == native.has_f16()
    assert not native.supports(torch.zeros(4)[::2])
    assert native.spec([lambda t, g0, g1: None]) is None
    assert native.spec([fused.Trim(0.1, 0), fused.Trim(0.2, 0)]) is None


def test_disabled_or_no_compiler_gives_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGE_CLI_NATIVE", "0")
    monkeypatch.setattr(native, "_why", [])
    assert native.lib.__wrapped__() is None
    assert native.unavailable_reason() == "disabled by MERGE_CLI_NATIVE=0"
    monkeypatch.setenv("MERGE_CLI_NATIVE", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_why", [])
    assert native.lib.__wrapped__() is None
    assert "no-such-cc" in native.unavailable_reason()


@needs_native
def test_builds_into_the_cache_dir(monkeypatch, tmp_path):
    """A fresh cache directory gets one library, reused by the next load."""
    monkeypatch.setenv("MERGE_CLI_CACHE", str(tmp_path / "cache"))
    so = native.lib.__wrapped__()
    assert so is not None
    built = list((tmp_path / "cache").glob("kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert native.lib.__wrapped__() is not None
    assert built[0].stat().st_mtime_ns == mtime
    out = torch.empty(8)
    so.mk_uniform(out.data_ptr(), 8, 0, 1, 2)
    assert np.array_equal(out.numpy(), native.uniform(8, 0, 1, 2).numpy())


@needs_native
@pytest.mark.parametrize("quantised", [True, False])
def test_narrow_finds_the_kth_largest_with_its_counts(quantised):
    """The histogram pass narrows a bracket onto the k-th largest |x - base| (checked against a sort):
    an exact answer carries the right counts above and equal; a narrower bracket still holds the value; a
    bracket that misses says so. Pieces (row chunks) give the same answer as the whole."""
    base, xs = _inputs(torch.bfloat16, n=50_000, quantised=quantised, seed=4)
    a = (xs[0].float() - base.float()).abs()
    srt = torch.sort(a, descending=True).values
    pieces = [(base[i : i + 7000], xs[0][i : i + 7000]) for i in range(0, 50_000, 7000)]
    for k in (1, 37, 5_000, 25_000, 49_999):
        kth = float(srt[k - 1])
        lo, hi = float(srt[min(k + 400, 49_999)]), float(srt[max(k - 400, 0)])
        for pairs in ([(base, xs[0])], pieces):
            got = native.narrow(pairs, lo, hi, k)
            while len(got) == 2:  # narrower: go on until exact
                assert got[0] <= kth <= got[1]
                got = native.narrow(pairs, got[0], got[1], k)
            value, above, equal = got
            assert value == kth
            assert above == int((a > kth).sum()) and equal == int((a == kth).sum())
            if k < 49_000:  # a bracket above the k-th largest misses
                assert native.narrow(pairs, float(srt[0]) * 2 + 1, float(srt[0]) * 2 + 2, k) is None
        idx = native.nth_equal(pieces, kth, 1)
        assert idx == int(torch.nonzero(a == kth)[0])


@needs_native
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
def test_narrow_many_answers_each_bracket_as_one_pass_of_its_own(cd):
    """Several brackets of one x in one pass (Breadcrumbs' two per model): each answer is the one-bracket
    answer checked against a sort of |x - base| in the compute dtype: exact value and counts, a
    single-value bracket (lo == hi), a narrower bracket, a miss; in row pieces as whole."""
    base, xs = _inputs(torch.bfloat16, n=40_000, quantised=True, seed=5)
    a = fused.abs_tau(xs[1], base, cd)
    srt = torch.sort(a, descending=True).values
    brackets = []
    for k in (3, 400, 12_000, 39_000):
        brackets.append((float(srt[min(k + 300, 39_999)]), float(srt[max(k - 300, 0)]), k))
    kth = float(srt[12_000 - 1])
    brackets.append((kth, kth, 12_000))  # one value: a count
    brackets.append((float(srt[0]) * 2 + 1, float(srt[0]) * 2 + 2, 50))  # misses
    pieces = [(base[i : i + 9000], xs[1][i : i + 9000]) for i in range(0, 40_000, 9000)]
    for pairs in ([(base, xs[1])], pieces):
        many = native.narrow_many(pairs, brackets, cd)
        for (lo, hi, k), got in zip(brackets, many):
            assert got == native.narrow(pairs, lo, hi, k, cd)
            if got is None:
                assert (lo, hi, k) == brackets[-1]
                continue
            while len(got) == 2:
                got = native.narrow(pairs, got[0], got[1], k, cd)
            value, above, equal = got
            assert value == float(srt[k - 1])
            assert above == int((a > value).sum()) and equal == int((a == value).sum())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@needs_native
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_native_linear_is_bitwise_the_eager_kernel(in_dtype, cd, out_dtype):
    """mk_linear against blocked.linear: mixed input dtypes, weights that are not powers of two (the fused
    multiply-adds show), with and without a divisor, a length that is no multiple of the tile, and values
    whose sums round differently in fp32 and in the half dtypes."""
    if torch.float16 in (in_dtype, cd, out_dtype) and not native.has_f16():
        pytest.skip("no _Float16")
    base, xs = _inputs(in_dtype, n=5 * native.TILE + 333, quantised=False)
    xs = [base, xs[0], xs[1].to(torch.float32), xs[2]]
    w = [0.3, 1.7, 0.45, 2.0 / 3.0]
    for divisor in (1.0, sum(w), 3.0):
        ref, ref_bad = fused.linear(xs, w, divisor, out_dtype, cd)
        got, bad = native.linear(xs, w, divisor, out_dtype, cd)
        assert got.dtype == out_dtype and torch.equal(_bits(ref), _bits(got)), divisor
        assert bad == ref_bad == [0, 0, 0, 0]


@needs_native
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_native_task_arithmetic_is_bitwise_the_eager_kernel(in_dtype, out_dtype):
    base, xs = _inputs(in_dtype, n=3 * native.TILE + 77, quantised=False)
    w = [0.7, 1.3, 0.4]
    for scale in (1.0, 0.37):
        ref = fused.task_arithmetic(base, xs, w, scale, out_dtype)
        got = native.task_arithmetic(base, xs, w, scale, out_dtype)
        assert torch.equal(_bits(ref[0]), _bits(got[0])), scale
        assert got[1] == ref[1] == [0, 0, 0, 0]
        assert got[2] == pytest.approx(ref[2], rel=1e-5)  # squared norms (summed in another order)


@needs_native
def test_native_linear_and_task_arithmetic_count_nonfinite_inputs():
    base, xs = _inputs(torch.float32, n=4000)
    xs[1][17] = float("inf")
    xs[2][5] = float("nan")
    _, bad = native.linear([base, *xs], [1.0] * 4, 4.0, torch.float32)
    assert bad == [0, 0, 1, 1]
    assert native.task_arithmetic(base, xs, [1.0] * 3, 1.0, torch.float32)[1] == [0, 0, 1, 1]


@needs_native
@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_native_task_arithmetic_half_is_bitwise_the_half_merge(cd, in_dtype, out_dtype):
    """mk_task_arith_half against mk_merge's plain sum with no sparsify steps (itself tested bitwise against
    the plain kernels in test_native_half.py): weights that round in the half dtype, divisors and lambdas,
    task vectors that cancel to zero (the +0 start of the sum), a length that is no multiple of the tile."""
    if cd == torch.float16 and not native.has_f16():
        pytest.skip("no _Float16")
    base, xs = _inputs(in_dtype, n=4 * native.TILE + 91, quantised=True, seed=7)
    xs[1][:500] = base[:500]  # tau = 0 for one model
    xs[2][:300] = (2 * base[:300].float() - xs[0][:300].float()).to(in_dtype)  # opposite task vectors
    empty = [native.spec([]) for _ in xs]
    w = [0.7, 1.3, 0.45]
    for divisor, lam in ((1.0, 1.0), (sum(w), 1.0), (3.0, 0.8), (1.0, 1.7)):
        ref = native.merge(base, xs, empty, w, lam, False, False, False, divisor, out_dtype, 0, cd)
        got = native.task_arithmetic_half(base, xs, w, divisor, lam, out_dtype, cd)
        assert torch.equal(_bits(ref[0]), _bits(got[0])), (divisor, lam)
        assert got[1] == ref[4] and got[2] == ref[5]
