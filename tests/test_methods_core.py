"""linear, task_arithmetic, ties, passthrough: hand-computed cases and METHODS.md §19 invariants."""

import itertools

import pytest
import torch

from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.methods.selection import topk_mask, topk_mask_rows


def params(method: str, n: int, **values) -> ParamSet:
    """Defaults of the method's Params, per-model fields as n-tuples, overridden by `values`."""
    spec = METHODS[method]
    inst = spec.params()
    out = {}
    for name in spec.params.model_fields:
        v = values.get(name, getattr(inst, name))
        if name in spec.params.per_model_fields() and not isinstance(v, tuple):
            v = (v,) * n
        out[name] = v
    return ParamSet(out)


def merge(method, base, tensors, weights=None, **values):
    n = len(tensors)
    p = params(method, n, **({"weight": tuple(weights)} if weights else {}), **values)
    w = list(p.weight) if "weight" in METHODS[method].params.per_model_fields() else [1.0] * n
    return METHODS[method].kernel(base, tensors, w, p, TensorCtx(name="t")), p


T = torch.tensor


# -- selection -------------------------------------------------------------------------------------
def test_topk_mask_exact_k_with_index_tie_break():
    x = T([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
    assert topk_mask(x, 1).tolist() == [False, True, False, False, False, False]
    assert topk_mask(x, 3).tolist() == [False, True, True, True, False, False]  # the first 2.0 wins
    assert topk_mask(x, 0).sum() == 0 and topk_mask(x, 6).all()


def test_topk_matches_stable_sort_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    for k in (1, 7, 50, 199):
        ref = torch.zeros(200, dtype=torch.bool)
        ref[torch.sort(-x, stable=True).indices[:k]] = True
        assert torch.equal(topk_mask(x, k), ref)


def test_topk_rows_keeps_exact_count_per_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 10, generator=g)
    m = topk_mask_rows(x.abs(), 0.3)
    assert m.sum(dim=1).tolist() == [3] * 5
    for r in range(5):
        assert torch.equal(m[r], topk_mask(x[r].abs(), 3))


# -- linear ----------------------------------------------------------------------------------------
def test_linear_hand_computed():
    a, b = T([[1.0, 2.0], [3.0, 4.0]]), T([[5.0, 6.0], [7.0, 8.0]])
    out, _ = merge("linear", None, [a, b], weights=[1.0, 3.0])
    assert torch.allclose(out, T([[4.0, 5.0], [6.0, 7.0]]))  # (1a + 3b) / 4
    out, _ = merge("linear", None, [a, b], weights=[1.0, 3.0], normalize=False)
    assert torch.allclose(out, a + 3 * b)


def test_linear_invariants():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 6, generator=g) for _ in range(3)]
    out, _ = merge("linear", None, xs, weights=[1.0, 0.0, 0.0])
    assert torch.equal(out, xs[0])
    out, _ = merge("linear", None, [xs[0]] * 3)
    assert torch.allclose(out, xs[0])
    w = [0.2, 0.5, 0.3]
    ref, _ = merge("linear", None, xs, weights=w)
    for perm in itertools.permutations(range(3)):
        out, _ = merge("linear", None, [xs[i] for i in perm], weights=[w[i] for i in perm])
        assert torch.allclose(out, ref, atol=1e-6)
    lo, hi = torch.stack(xs).min(0).values, torch.stack(xs).max(0).values
    assert ((ref >= lo - 1e-6) & (ref <= hi + 1e-6)).all()


# -- task arithmetic --------------------------------------------------------------------------------
def test_task_arithmetic_hand_computed_and_invariants():
    base = T([1.0, 1.0, 1.0])
    a, b = T([2.0, 1.0, 0.0]), T([1.0, 3.0, 1.0])
    out, _ = merge("task_arithmetic", base, [a, b], weights=[1.0, 0.5], lambda_=2.0)
    # tau_a = [1, 0, -1], tau_b = [0, 2, 0]; 2 * (tau_a + 0.5 tau_b) = [2, 2, -2]
    assert torch.allclose(out, T([3.0, 3.0, -1.0]))
    assert torch.equal(merge("task_arithmetic", base, [a, b], lambda_=0.0)[0], base)
    assert torch.allclose(merge("task_arithmetic", base, [a])[0], a)
    avg = merge("task_arithmetic", base, [a, b], lambda_=0.5)[0]
    assert torch.allclose(avg, (a + b) / 2)
    # linear in lambda
    o1, o2 = (
        merge("task_arithmetic", base, [a, b], lambda_=0.3)[0],
        merge("task_arithmetic", base, [a, b], lambda_=0.6)[0],
    )
    assert torch.allclose(o2 - base, 2 * (o1 - base))


# -- ties ------------------------------------------------------------------------------------------
# tau1 = [1, -2, 3, 0.5], tau2 = [-1, 1.5, 2, -4], density 0.75 -> k = 3 per tensor:
#   trimmed1 = [1, -2, 3, 0], trimmed2 = [0, 1.5, 2, -4]
#   unweighted sum [1, -0.5, 5, -4] -> elected signs [+, -, +, -]
#   disjoint mean: [1, -2, (3+2)/2, -4]; sum: [1, -2, 5, -4]; max: [1, -2, 3, -4]
BASE = T([0.5, 0.5, 0.5, 0.5])
TAU1, TAU2 = T([1.0, -2.0, 3.0, 0.5]), T([-1.0, 1.5, 2.0, -4.0])


@pytest.mark.parametrize(
    "func,expected",
    [("mean", [1.0, -2.0, 2.5, -4.0]), ("sum", [1.0, -2.0, 5.0, -4.0]), ("max", [1.0, -2.0, 3.0, -4.0])],
)
def test_ties_hand_computed(func, expected):
    out, _ = merge("ties", BASE, [BASE + TAU1, BASE + TAU2], density=0.75, merge_func=func)
    assert torch.allclose(out, BASE + T(expected))


def test_ties_weights_after_election_vs_mergekit_weighted_election():
    xs = [BASE + TAU1, BASE + TAU2]
    # paper election (unweighted) then weighted disjoint mean: coord 2 = (1*3 + 2*2) / 3
    out, _ = merge("ties", BASE, xs, weights=[1.0, 2.0], density=0.75)
    assert torch.allclose(out, BASE + T([1.0, -2.0, 7.0 / 3.0, -4.0]))
    # weighted election: weighted sum [1, 1, 7, -8] flips coord 1 to +, where only tau2 (1.5) agrees
    out, _ = merge("ties", BASE, xs, weights=[1.0, 2.0], density=0.75, weighted_election=True)
    assert torch.allclose(out, BASE + T([1.0, 1.5, 7.0 / 3.0, -4.0]))


def test_ties_reports_kept_fraction_and_conflicts():
    ctx = TensorCtx(name="t")
    p = params("ties", 2, density=0.75)
    METHODS["ties"].kernel(BASE, [BASE + TAU1, BASE + TAU2], [1.0, 1.0], p, ctx)
    assert ctx.stats["kept_fraction"] == [0.75, 0.75]
    assert ctx.stats["sign_conflict_rate"] == pytest.approx(0.25)  # coord 1 of 4 touched


def test_ties_invariants():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=g)
    taus = [torch.randn(6, 8, generator=g) for _ in range(3)]
    xs = [base + t for t in taus]
    # N = 1, k = 1, lambda = 1 -> theta1
    assert torch.allclose(merge("ties", base, xs[:1], density=1.0)[0], xs[0], atol=1e-6)
    # identical models, k = 1 -> theta1 (dis-mean)
    assert torch.allclose(merge("ties", base, [xs[0]] * 3, density=1.0)[0], xs[0], atol=1e-6)
    # no sign conflict, k = 1, dis-sum -> task arithmetic
    pos = [base + t.abs() for t in taus]
    ta = merge("task_arithmetic", base, pos, lambda_=0.7)[0]
    assert torch.allclose(
        merge("ties", base, pos, density=1.0, merge_func="sum", lambda_=0.7)[0], ta, atol=1e-5
    )
    # dis-mean with every tau nonzero and agreeing -> TA with lambda = 1/N
    assert torch.allclose(
        merge("ties", base, pos, density=1.0)[0],
        merge("task_arithmetic", base, pos, lambda_=1 / 3)[0],
        atol=1e-5,
    )
    # positive homogeneity
    m1 = merge("ties", base, xs, density=0.4)[0] - base
    m2 = merge("ties", base, [base + 2.5 * t for t in taus], density=0.4)[0] - base
    assert torch.allclose(m2, 2.5 * m1, atol=1e-5)
    # permutation invariance
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(
            merge("ties", base, [xs[i] for i in perm], density=0.4)[0], m1 + base, atol=1e-6
        )
    # kept fraction is int(k * n) / n per tensor
    ctx = TensorCtx(name="t")
    METHODS["ties"].kernel(base, xs, [1.0] * 3, params("ties", 3, density=0.4), ctx)
    assert ctx.stats["kept_fraction"] == pytest.approx([int(0.4 * 48) / 48] * 3)


def test_ties_all_zero_task_vectors_give_base_without_nan():
    base = torch.randn(3, 3)
    out, _ = merge("ties", base, [base.clone(), base.clone()], density=0.5)
    assert torch.equal(out, base)


def test_passthrough_scale():
    x = T([1.0, -2.0])
    assert torch.equal(merge("passthrough", None, [x])[0], x)
    assert torch.equal(merge("passthrough", None, [x], scale=0.5)[0], T([0.5, -1.0]))


@pytest.mark.parametrize("n,k", [(100_000, 1), (100_000, 30_000), (200_003, 199_999), (150_000, 75_000)])
def test_bracketed_selection_equals_stable_sort_on_large_tensors(n, k):
    g = torch.Generator().manual_seed(n + k)
    # bf16-derived deltas: many exact ties, like real task vectors of bf16 checkpoints
    x = (
        torch.randn(n, generator=g).bfloat16().float() - torch.randn(n, generator=g).bfloat16().float()
    ).abs()
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.sort(-x, stable=True).indices[:k]] = True
    assert torch.equal(topk_mask(x, k), ref)


@pytest.mark.parametrize("frac", [0.001, 0.3, 0.9])
def test_streaming_topk_matches_whole_tensor_selection(frac):
    from merge_cli.methods.selection import StreamingTopK, find_threshold, mask_from_threshold

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 700, generator=g).bfloat16().float().abs()
    x[::7] = 0.0  # rows that did not move at all: a huge block of ties
    k = int(frac * x.numel())
    st = StreamingTopK(k, x.numel())
    for rows in torch.split(x, 37):
        st.update(rows)
    st.next_pass()
    for rows in torch.split(x, 37):
        st.update(rows)
    t = st.result()
    assert t == find_threshold(x, k)
    seen, parts = 0, []
    for rows in torch.split(x, 37):
        parts.append(mask_from_threshold(rows, t, seen))
        seen += int((rows == t.value).sum())
    assert torch.equal(torch.cat(parts), topk_mask(x, k)) and int(torch.cat(parts).sum()) == k
