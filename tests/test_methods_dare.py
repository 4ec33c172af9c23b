"""DARE (dare_linear, dare_ties): hand-computed values, METHODS.md §19 invariants, seeded randomness."""

from __future__ import annotations

import math

import torch
from method_helpers import run_kernel, t, uniform_draws

BASE = t([0.5, 0.0, -1.0], [2.0, 1.0, 0.0])
TAU1 = t([1.0, -2.0, 3.0], [4.0, -5.0, 6.0])
TAU2 = t([-3.0, 1.0, 1.0], [0.5, 2.0, -1.0])


def _plain_dare(tau, u, density, how):
    """Loops: keep where u < density; rescale by 1/density (inv_p) or by the L1 ratio (l1)."""
    flat, uf = tau.reshape(-1).tolist(), u.reshape(-1).tolist()
    kept = [x if ui < density else 0.0 for x, ui in zip(flat, uf, strict=True)]
    if how == "inv_p":
        kept = [x / density for x in kept]
    elif how == "l1":
        a, b = sum(abs(x) for x in flat), sum(abs(x) for x in kept)
        if a >= 1e-7 and b >= 1e-7:
            kept = [x * a / b for x in kept]
    return torch.tensor(kept).reshape(tau.shape)


def test_dare_linear_matches_plain_loops():
    for how in ("inv_p", "l1", "none"):
        out, stats = run_kernel(
            "dare_linear", BASE, [BASE + TAU1, BASE + TAU2], seed=5, tensor="layer.w",
            per_model={"density": [0.5, 0.7], "weight": [1.0, 0.5]}, rescale=how, **{"lambda": 0.8},
        )  # fmt: skip
        d1 = _plain_dare(TAU1, uniform_draws(5, "layer.w", 0, TAU1.shape), 0.5, how)
        d2 = _plain_dare(TAU2, uniform_draws(5, "layer.w", 1, TAU2.shape), 0.7, how)
        torch.testing.assert_close(out, BASE + 0.8 * (d1 + 0.5 * d2))
    assert len(stats["kept_fraction"]) == 2


def test_dare_hand_computed_mask():
    # with u known, density 0.5: tau / 0.5 where u < 0.5
    u = uniform_draws(0, "w", 0, (2, 3))
    out, _ = run_kernel("dare_linear", torch.zeros(2, 3), [TAU1], per_model={"density": [0.5]})
    for i in range(2):
        for j in range(3):
            want = TAU1[i, j].item() * 2.0 if u[i, j].item() < 0.5 else 0.0
            assert out[i, j].item() == want


def test_density_one_is_the_downstream_merger():
    ta, _ = run_kernel("task_arithmetic", BASE, [BASE + TAU1, BASE + TAU2], per_model={"weight": [1.0, 0.5]})
    dl, _ = run_kernel(
        "dare_linear", BASE, [BASE + TAU1, BASE + TAU2], per_model={"weight": [1.0, 0.5], "density": [1, 1]}
    )
    assert torch.equal(ta, dl)
    ties, _ = run_kernel("ties", BASE, [BASE + TAU1, BASE + TAU2], per_model={"density": [0.5, 0.5]})
    dt, _ = run_kernel(
        "dare_ties", BASE, [BASE + TAU1, BASE + TAU2], per_model={"density": [1, 1]}, trim_density=0.5
    )
    assert torch.equal(ties, dt)


def test_density_zero_gives_base_without_nan():
    for how in ("inv_p", "l1"):
        out, _ = run_kernel(
            "dare_ties", BASE, [BASE + TAU1, BASE + TAU2], per_model={"density": [0, 0]}, rescale=how
        )
        assert torch.equal(out, BASE)
    out, _ = run_kernel("dare_linear", BASE, [BASE, BASE], per_model={"density": [0.3, 0.3]}, rescale="l1")
    assert torch.equal(out, BASE)


def test_dare_ties_mergekit_semantics_hand_computed():
    # no drop, no trim, weighted election, sum of agreeing deltas:
    # sum = [-2, -1, 4 | 4.5, -3, 5] -> signs [-, -, + | +, -, +]
    out, _ = run_kernel(
        "dare_ties",
        BASE,
        [BASE + TAU1, BASE + TAU2],
        per_model={"density": [1, 1]},
        trim_density=1.0,
        normalize=False,
    )
    torch.testing.assert_close(out - BASE, t([-3.0, -2.0, 4.0], [4.5, -5.0, 6.0]))
    out, _ = run_kernel(
        "dare_ties", BASE, [BASE + TAU1, BASE + TAU2], per_model={"density": [1, 1]}, trim_density=1.0
    )
    torch.testing.assert_close(out - BASE, t([-3.0, -2.0, 2.0], [2.25, -5.0, 6.0]))


def test_dare_ties_paper_trim_hand_computed():
    # trim to int(0.34 * 6) = 2 per model: tau1 -> 6, -5 ; tau2 -> -3, 2 ; elect on the sum, disjoint mean
    out, _ = run_kernel(
        "dare_ties", BASE, [BASE + TAU1, BASE + TAU2], per_model={"density": [1, 1]}, trim_density=0.34
    )
    torch.testing.assert_close(out - BASE, t([-3.0, 0.0, 0.0], [0.0, -5.0, 6.0]))


def test_l1_rescale_preserves_l1_norm():
    tau = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    out, _ = run_kernel(
        "dare_linear", torch.zeros_like(tau), [tau], per_model={"density": [0.3]}, rescale="l1"
    )
    assert math.isclose(float(out.abs().sum()), float(tau.abs().sum()), rel_tol=1e-5)


def test_inv_p_is_unbiased_monte_carlo():
    tau = t([1.0, -2.0, 3.0])
    runs = 3000
    acc = torch.zeros(3, dtype=torch.float64)
    for k in range(runs):
        out, _ = run_kernel(
            "dare_linear", torch.zeros(3), [tau], per_model={"density": [0.3]}, tensor=f"w{k}"
        )
        acc += out.double()
    mean = acc / runs
    sd = tau.abs().double() * math.sqrt((1 / 0.3 - 1) / runs)
    assert torch.all((mean - tau.double()).abs() < 5 * sd), (mean, sd)


def test_kept_count_is_binomial():
    n, d = 200_000, 0.3
    out, stats = run_kernel(
        "dare_linear", torch.zeros(n), [torch.ones(n)], per_model={"density": [d]}, seed=11
    )
    kept = int((out != 0).sum())
    assert abs(kept - n * d) < 5 * math.sqrt(n * d * (1 - d))
    assert math.isclose(stats["kept_fraction"][0], kept / n, rel_tol=1e-6)


def test_same_seed_bitwise_regardless_of_order_and_global_rng():
    names = ["a.weight", "b.weight", "c.bias"]
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3))

    def run(order, gseed):
        torch.manual_seed(gseed)
        return {
            n: run_kernel("dare_ties", x[0], [x[0] + x[1], x[0] - x[1]], seed=9, tensor=n)[0] for n in order
        }

    a, b = run(names, 1), run(list(reversed(names)), 2)
    assert all(torch.equal(a[n], b[n]) for n in names)


def test_masks_differ_by_name_model_and_seed():
    tau = torch.ones(4000)
    m = {}
    for key, kw in {"a": dict(tensor="a"), "b": dict(tensor="b"), "s": dict(tensor="a", seed=1)}.items():
        out, _ = run_kernel(
            "dare_linear",
            torch.zeros(4000),
            [tau, tau],
            per_model={"density": [0.5, 0.5], "weight": [1.0, 2.0]},
            **kw,
        )
        m[key] = out
    assert not torch.equal(m["a"], m["b"]) and not torch.equal(m["a"], m["s"])
    # per model index: weights 1 and 2 give sums in {0, 2, 4, 6}; both 2 and 4 occur only if the masks differ
    vals = set(m["a"].unique().tolist())
    assert {2.0, 4.0} <= vals


def test_rescale_accepts_mergekit_booleans():
    out_true, _ = run_kernel("dare_linear", BASE, [BASE + TAU1], per_model={"density": [0.5]}, rescale=True)
    out_l1, _ = run_kernel("dare_linear", BASE, [BASE + TAU1], per_model={"density": [0.5]}, rescale="l1")
    out_false, _ = run_kernel("dare_linear", BASE, [BASE + TAU1], per_model={"density": [0.5]}, rescale=False)
    out_none, _ = run_kernel("dare_linear", BASE, [BASE + TAU1], per_model={"density": [0.5]}, rescale="none")
    assert torch.equal(out_true, out_l1) and torch.equal(out_false, out_none)
