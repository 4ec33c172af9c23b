"""The native kernels in a half compute dtype (bf16, fp16): bitwise the plain kernels' arithmetic in that
dtype. The reference is built from the plain kernels' own functions (ties.elect, ties.disjoint_merge,
task_arithmetic.weighted_sum) on torch tensors in the compute dtype, so every rounding is torch's."""

from __future__ import annotations

import pytest
import torch
from kernel_steps import sparsify_steps

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.kernels.gta import Draws
from merge_cli.kernels.ties import ties_thresholds
from merge_cli.methods.task_arithmetic import weighted_sum
from merge_cli.methods.ties import disjoint_merge, elect

needs_native = pytest.mark.skipif(
    native.lib() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
HALF = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not native.has_f16(), reason="the C compiler has no _Float16"))]  # fmt: skip


class _Ctx:
    seed, name = 5, "model.layers.2.self_attn.q_proj.weight"


def _inputs(dtype, n=9_000, m=3, kind="quantised", seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    if kind == "wide":  # large magnitudes: fp16 rounding (and overflow near 65504) matters
        base = base * 3000.0
    xs = []
    for _ in range(m):
        if kind == "quantised":
            step = 2.0**-6 * torch.randint(-3, 4, (n,), generator=g).float()
        elif kind == "wide":
            step = 200.0 * torch.randn(n, generator=g)
        else:
            step = 0.01 * torch.randn(n, generator=g)
        xs.append((base + step).to(dtype))
    return base.to(dtype), xs


def _plain_sparsify(t: torch.Tensor, steps, g0: int) -> torch.Tensor:
    """The plain kernels' sparsify ops in t's (half) dtype: masks multiply exactly, rescales round."""
    idx = torch.arange(g0, g0 + t.numel())

    def keep(trim):
        a = t.abs().float()
        return (a > trim.thr) | ((a == trim.thr) & (idx < trim.cutoff))

    for st in steps:
        if isinstance(st, fused.Trim):
            t = t * keep(st)
        elif isinstance(st, fused.Band):
            hi = keep(st.hi) if st.hi is not None else torch.ones_like(idx, dtype=torch.bool)
            top = keep(st.top) if st.top is not None else torch.zeros_like(idx, dtype=torch.bool)
            t = t * (hi & ~top)
        elif isinstance(st, fused.KeepBelow):
            t = t * (st.draws(g0, g0 + t.numel()) > 0)
            if st.mul is not None:
                t = t * st.mul
            if st.div is not None:
                t = t / st.div
        else:
            assert st is fused.negate
            t = -t
    return t


def _plain(base, xs, steps, offset, w, lam, consensus, weighted, mean, divisor, out_dtype, cd):
    b = base.to(cd)
    sparse = [_plain_sparsify(x.to(cd) - b, s, offset) for x, s in zip(xs, steps)]
    kept = [int(torch.count_nonzero(s)) for s in sparse]
    if consensus:
        stats = {"kept": [0] * len(xs), "touched": 0, "conflict": 0}
        sign = elect(sparse, w, weighted)
        merged = disjoint_merge(sparse, w, sign, "mean" if mean else "sum", stats)
        out = merged.mul_(lam).add_(b)
        return out.to(out_dtype), kept, stats["touched"], stats["conflict"]
    mixed = weighted_sum(sparse, w, b)
    if divisor != 1.0:
        mixed = mixed / divisor
    return (b + lam * mixed).to(out_dtype), kept, None, None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@needs_native
@pytest.mark.parametrize("cd", HALF)
@pytest.mark.parametrize("kind", ["none", "trim", "band", "dare"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("data", ["quantised", "gaussian", "wide"])
def test_half_merge_is_bitwise_the_plain_ops(cd, kind, in_dtype, data):
    """Every step kind x input dtype x compute dtype, consensus (weighted or not, mean or sum, lambda) and the
    plain weighted sum, at a non-zero flat offset and over a length that is no multiple of the tile: the
    output bits (in the compute dtype and widened to fp32) and the counts are the plain kernels'."""
    if in_dtype == torch.float16 and not native.has_f16():
        pytest.skip("no _Float16")
    base, xs = _inputs(in_dtype, kind=data, seed=hash((kind, data)) % 1000)
    steps = sparsify_steps(kind, base, xs, _Ctx, cd, dare_density=0.45)
    specs = [native.spec(s) for s in steps]
    for offset in (0, 4096 + 17):
        for w, weighted, mean, lam in (
            ([0.7, 1.3, 0.4], True, True, 1.0),
            ([0.7, 1.3, 0.4], False, False, 0.8),
            ([1.0, 1.0, 1.0], True, False, 1.0),
            ([1e-5, 3e-5, 2e-5], True, True, 1.0),  # fp16: the mean's divisor meets the clamp to tiny
            ([0.7, 0.0, 0.4], True, True, 1.3),  # a zero weight: den == 0 -> 1 instead of the clamp
        ):
            for out_dtype in (cd, torch.float32):
                ref = _plain(base, xs, steps, offset, w, lam, True, weighted, mean, 1.0, out_dtype, cd)
                got = native.merge(base, xs, specs, w, lam, True, weighted, mean, 1.0, out_dtype, offset, cd)
                assert torch.equal(_bits(ref[0]), _bits(got[0])), (offset, w, weighted, mean, out_dtype)
                assert list(ref[1:4]) == list(got[1:4])
        for divisor, lam in ((2.4, 0.9), (1.0, 1.0)):
            w = [0.7, -1.3, 0.4]
            ref = _plain(base, xs, steps, offset, w, lam, False, False, False, divisor, cd, cd)
            got = native.merge(base, xs, specs, w, lam, False, False, False, divisor, cd, offset, cd)
            assert torch.equal(_bits(ref[0]), _bits(got[0])) and ref[1] == got[1]


@needs_native
@pytest.mark.parametrize("cd", HALF)
def test_half_selection_and_l1_sums_see_the_rounded_task_vectors(cd):
    """Thresholds, tie cutoffs, band counts and L1 sums are taken over |cd(cd(x) - cd(base))|: checked
    against a sort of the plain task vector (fp32 inputs, so the rounding to cd matters)."""
    base, xs = _inputs(torch.float32, n=30_000, kind="gaussian", seed=3)
    (t,), (cut,) = ties_thresholds(base, xs[:1], [0.3], cd)
    a = (xs[0].to(cd) - base.to(cd)).abs().float()
    k = int(0.3 * a.numel())
    kth = float(torch.sort(a, descending=True).values[k - 1])
    assert t.value == kth and t.above == int((a > kth).sum()) and t.equal == int((a == kth).sum())
    if not t.keep_all_equal:
        assert int(((a == kth) & (torch.arange(a.numel()) < cut)).sum()) == t.take_equal
    above, per = native.band_counts(base, xs[0], kth, kth, native.TILE * 4, cd)
    assert above == int((a > kth).sum()) and sum(per) == int((a == kth).sum())
    steps = [[fused.KeepBelow(Draws(_Ctx, 0, 0.4), mul=1.5)]]
    (l1, l1_kept), = native.l1_sums(base, xs[:1], [native.spec(steps[0])], 0, cd)  # fmt: skip
    tau = xs[0].to(cd) - base.to(cd)
    assert l1 == pytest.approx(float(tau.abs().double().sum()), rel=1e-12)
    sparse = _plain_sparsify(tau, steps[0], 0)
    assert l1_kept == pytest.approx(float(sparse.abs().double().sum()), rel=1e-12)


@pytest.mark.parametrize("cd", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_eager_linear_in_a_half_dtype_is_the_plain_kernel(monkeypatch, cd, in_dtype):
    """linear runs on the eager blocked kernel in every compute dtype: inputs rounded to cd, the fp32 sum,
    the result rounded to cd (blocks small enough to cross boundaries)."""
    from merge_cli.methods.base import ParamSet
    from merge_cli.methods.linear import linear

    monkeypatch.setattr(fused, "BLOCK", 1000)
    _, xs = _inputs(in_dtype, n=4321, kind="wide", seed=9)
    w = [0.3, 0.5, 0.25]
    ref = linear(None, [x.to(cd) for x in xs], w, ParamSet({"normalize": True, "numerics": "exact"}), None)
    for out_dtype in (cd, torch.float32):
        got, bad = fused.linear(xs, w, sum(w), out_dtype, cd)
        assert torch.equal(_bits(got), _bits(ref.to(out_dtype))) and bad == [0, 0, 0]
