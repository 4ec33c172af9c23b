"""DELLA (della, della_linear): keep probabilities, hand values, DARE equivalence, validation."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import check_error, run_kernel, t, uniform_draws

from merge_cli.methods.della import keep_probability


def _plain_q(row: list[float], density: float, eps: float) -> list[float]:
    n = len(row)
    if n == 1:
        return [density]
    order = sorted(range(n), key=lambda i: (abs(row[i]), i))  # ascending, ties by index
    rank = {i: r for r, i in enumerate(order)}
    return [(density - eps) + 2 * eps * rank[i] / (n - 1) for i in range(n)]


def test_keep_probability_hand_computed():
    # |x| ascending: 0.5, 1, 2, -3 -> rho = 0, 1/3, 2/3, 1 ; q = 0.4 + 0.2 rho
    q = keep_probability(t([0.5, -3.0, 1.0, 2.0]), 0.5, 0.1)
    torch.testing.assert_close(q, t([0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3]))


def test_della_linear_matches_plain_loops():
    base = t([0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    taus = [t([0.5, -3.0, 1.0, 2.0], [4.0, 0.1, -0.2, 0.3]), t([-1.0, 2.0, 0.25, -4.0], [0.0, 1.0, 2.0, 3.0])]
    out, _ = run_kernel(
        "della_linear", base, [base + x for x in taus], per_model={"weight": [1.0, 0.5], "density": [0.5, 0.6]},
        epsilon=0.1, seed=3, tensor="m.w", **{"lambda": 1.0},
    )  # fmt: skip
    want = base.clone()
    for i, (x, d, w) in enumerate(zip(taus, [0.5, 0.6], [1.0, 0.5], strict=True)):
        u = uniform_draws(3, "m.w", i, x.shape)
        for r, row in enumerate(x.tolist()):
            q = _plain_q(row, d, 0.1)
            for c, v in enumerate(row):
                if u[r, c].item() < q[c]:
                    want[r, c] += w * v / q[c]
    torch.testing.assert_close(out, want)


def test_della_no_drop_hand_computed():
    # density 1: no drop -> elect sign on the weighted sum, disjoint weighted mean, times lambda
    base = torch.zeros(3)
    out, stats = run_kernel(
        "della", base, [t([1.0, -2.0, 3.0]), t([-3.0, 1.0, 1.0])], density=1.0, **{"lambda": 2.0}
    )
    torch.testing.assert_close(out, 2.0 * t([-3.0, -2.0, 2.0]))
    assert stats["sign_conflict_rate"] == pytest.approx(2 / 3)


def test_epsilon_zero_is_dare_with_the_same_seed():
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    base = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
    a, _ = run_kernel(
        "della_linear", base, [base + x, base - x], density=0.4, epsilon=0.0, seed=7, **{"lambda": 1.0}
    )
    b, _ = run_kernel("dare_linear", base, [base + x, base - x], density=0.4, seed=7)
    assert torch.equal(a, b)


def test_density_one_is_a_no_op():
    base, x = torch.zeros(3, 4), torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out, _ = run_kernel("della_linear", base, [x], density=1.0, **{"lambda": 1.0})
    assert torch.equal(out, x)


def test_probabilities_bounded_and_rising_within_rows():
    x = torch.randn(8, 33, generator=torch.Generator().manual_seed(3))
    q = keep_probability(x, 0.6, 0.15)
    assert float(q.min()) >= 0.45 - 1e-6 and float(q.max()) <= 0.75 + 1e-6
    for row_x, row_q in zip(x, q, strict=True):
        order = row_x.abs().argsort()
        assert torch.all(row_q[order].diff() > 0)
        torch.testing.assert_close(row_q, torch.tensor(_plain_q(row_x.tolist(), 0.6, 0.15)))


def test_row_length_one_and_zero_tensors_have_no_nan():
    x = torch.randn(5, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(keep_probability(x, 0.3, 0.1), torch.full((5, 1), 0.3))
    out, _ = run_kernel("della", torch.zeros(5, 1), [x, -x], density=0.3, epsilon=0.1)
    assert torch.isfinite(out).all()
    out, _ = run_kernel("della", torch.ones(4, 3), [torch.ones(4, 3), torch.ones(4, 3)], rescale="l1")
    assert torch.equal(out, torch.ones(4, 3))


def test_inv_p_unbiased_monte_carlo():
    tau = t([0.1, -2.0, 3.0, 0.7])
    q = _plain_q(tau.tolist(), 0.5, 0.2)
    runs = 2000
    acc = torch.zeros(4, dtype=torch.float64)
    for k in range(runs):
        out, _ = run_kernel(
            "della_linear", torch.zeros(4), [tau], density=0.5, epsilon=0.2, tensor=f"x{k}", **{"lambda": 1.0}
        )
        acc += out.double()
    sd = torch.tensor(
        [abs(v) * math.sqrt((1 / qi - 1) / runs) for v, qi in zip(tau.tolist(), q, strict=True)]
    )
    assert torch.all((acc / runs - tau.double()).abs() < 5 * sd)


@pytest.mark.parametrize("density,eps", [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_window_outside_unit_interval_is_a_plan_time_error(density, eps):
    for name in ("della", "della_linear"):
        msg = check_error(name, 2, per_model={"density": [0.5, density], "epsilon": [0.1, eps]})
        assert msg and "model 2" in msg and "epsilon" in msg
    assert check_error("della", 1, density=1.0, epsilon=0.3) is None


def test_bad_epsilon_in_a_recipe_fails_the_plan(family, tmp_path):
    from helpers import run_cli, write_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"base_model": str(family["base"]), "models": [{"model": str(family["expert0"])}], "method": "della",
         "parameters": {"density": 0.9, "epsilon": 0.2}},
    )  # fmt: skip
    res = run_cli("plan", recipe)
    assert res.exit_code == 2
    assert "epsilon" in res.stderr and "Traceback" not in res.stderr
