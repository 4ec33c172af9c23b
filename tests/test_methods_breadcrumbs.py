"""Model Breadcrumbs: exact band counts, hand values, the mergekit slice-bug regression, TIES variant."""

from __future__ import annotations

import pytest
import torch
from method_helpers import run_kernel, t


def _plain_band(row: list[float], density: float, gamma: float) -> list[float]:
    """Sort indices by |x| descending (lowest index first on ties), drop the top, keep the next int(d n)."""
    n = len(row)
    keep, top = int(density * n), int(gamma * n)
    top = min(top, n - keep)
    order = sorted(range(n), key=lambda i: (-abs(row[i]), i))
    kept = set(order[top : top + keep])
    return [row[i] if i in kept else 0.0 for i in range(n)]


def test_hand_computed_row():
    # |x| order: -5, 3, 2, 1, -0.2, 0.1 ; gamma 0.2 -> int(1.2) = 1 removed (-5); density 0.5 -> keep 3
    row = t([0.1, -5.0, 3.0, -0.2, 2.0, 1.0])
    out, stats = run_kernel(
        "breadcrumbs", torch.zeros(6), [row], per_model={"density": [0.5], "gamma": [0.2]}
    )
    assert out.tolist() == [0.0, 0.0, 3.0, 0.0, 2.0, 1.0]
    assert stats["kept_fraction"] == [0.5]


def test_row_versus_tensor_granularity_hand_computed():
    x = t([7.0, 9.0, 2.0], [3.0, 4.0, 1.0])
    # rows: n = 3, keep int(0.67 * 3) = 2, top int(0.34 * 3) = 1 -> [7, 0, 2], [3, 0, 1]
    row, _ = run_kernel("breadcrumbs", torch.zeros(2, 3), [x], density=0.67, gamma=0.34, granularity="row")
    assert row.tolist() == [[7.0, 0.0, 2.0], [3.0, 0.0, 1.0]]
    # tensor: n = 6, keep int(0.67 * 6) = 4, top int(0.34 * 6) = 2 (9, 7) -> 4, 3, 2, 1 kept
    ten, _ = run_kernel("breadcrumbs", torch.zeros(2, 3), [x], density=0.67, gamma=0.34, granularity="tensor")
    assert ten.tolist() == [[0.0, 0.0, 2.0], [3.0, 4.0, 1.0]]


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("density,gamma", [(0.29, 0.01), (0.5, 0.0), (0.15, 0.006), (0.9, 0.2), (0.07, 0.33)])
def test_exact_counts_and_plain_reference(granularity, density, gamma):
    x = torch.randn(7, 100, generator=torch.Generator().manual_seed(0))
    out, _ = run_kernel(
        "breadcrumbs", torch.zeros_like(x), [x], density=density, gamma=gamma, granularity=granularity
    )
    if granularity == "row":
        want = torch.tensor([_plain_band(r, density, gamma) for r in x.tolist()])
        assert all(int((r != 0).sum()) == int(density * 100) for r in out)
    else:
        want = torch.tensor(_plain_band(x.reshape(-1).tolist(), density, gamma)).reshape(x.shape)
        assert int((out != 0).sum()) == int(density * 700)
    assert torch.equal(out, want)


def test_gamma_zero_is_magnitude_top_k():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    out, _ = run_kernel(
        "breadcrumbs", torch.zeros_like(x), [x], density=0.25, gamma=0.0, granularity="tensor"
    )
    ties, _ = run_kernel("ties", torch.zeros_like(x), [x], density=0.25, merge_func="sum")
    assert torch.equal(out, ties)


def test_largest_entries_are_removed():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(4))
    out, _ = run_kernel("breadcrumbs", torch.zeros_like(x), [x], density=0.3, gamma=0.1)
    top = x.abs().topk(5, dim=1).indices
    assert torch.all(out.gather(1, top) == 0)


@pytest.mark.parametrize("gamma", [0.0, 0.01])
def test_small_tensor_is_not_zeroed_regression(gamma):
    # mergekit slices [n_bot:-n_top]; with n_top = int(0.01 * 64) = 0 that is empty and zeroes the bias
    bias = torch.randn(64, generator=torch.Generator().manual_seed(5))
    for granularity in ("row", "tensor"):
        out, _ = run_kernel(
            "breadcrumbs", torch.zeros(64), [bias], density=0.5, gamma=gamma, granularity=granularity
        )
        assert int((out != 0).sum()) == 32
        assert torch.equal(out, torch.tensor(_plain_band(bias.tolist(), 0.5, gamma)))


def test_density_one_is_a_no_op_and_zero_dim_untouched():
    x = t([[1.0, -2.0], [3.0, 0.5]])
    out, _ = run_kernel("breadcrumbs", torch.zeros(2, 2), [x], density=1.0, gamma=0.3)
    assert torch.equal(out, x)
    s = torch.tensor(0.7)
    out, _ = run_kernel("breadcrumbs", torch.tensor(0.2), [s], density=0.5, gamma=0.1)
    assert torch.equal(out, s)


def test_breadcrumbs_ties_hand_computed():
    base = t([1.0, 1.0, 1.0, 1.0])
    a = t([4.0, -1.0, 2.0, -3.0])  # band density 0.5, gamma 0.25 -> drop 4, keep -3, 2
    b = t([-2.0, 5.0, 1.0, 3.0])  # drop 5, keep 3, -2
    # kept a = [0, 0, 2, -3], b = [-2, 0, 0, 3]; weighted (1, 2) sum = [-4, 0, 2, 3] -> gamma [-, + (zero sum), +, +]
    out, stats = run_kernel(
        "breadcrumbs_ties",
        base,
        [base + a, base + b],
        per_model={"weight": [1.0, 2.0]},
        density=0.5,
        gamma=0.25,
    )
    assert (out - base).tolist() == [-4.0, 0.0, 2.0, 6.0]
    out, _ = run_kernel(
        "breadcrumbs_ties", base, [base + a, base + b], per_model={"weight": [1.0, 2.0]}, density=0.5, gamma=0.25,
        normalize=True,
    )  # fmt: skip
    assert (out - base).tolist() == [-2.0, 0.0, 2.0, 3.0]
    assert stats["sign_conflict_rate"] == pytest.approx(1 / 3)


def test_breadcrumbs_is_a_weighted_sum():
    base = torch.zeros(8)
    a, b = torch.arange(1.0, 9.0), -torch.arange(1.0, 9.0).flip(0)
    out, _ = run_kernel(
        "breadcrumbs",
        base,
        [a, b],
        per_model={"weight": [0.5, 2.0]},
        density=0.5,
        gamma=0.125,
        **{"lambda": 2.0},
    )
    want = 2.0 * (
        0.5 * torch.tensor(_plain_band(a.tolist(), 0.5, 0.125))
        + 2.0 * torch.tensor(_plain_band(b.tolist(), 0.5, 0.125))
    )
    assert torch.equal(out, want)


def test_consensus_uses_the_sign_of_the_weighted_delta():
    # a negative weight flips a model's vote and its contribution (mergekit: mask = sign(w tau) == gamma)
    base = torch.zeros(2)
    a, b = t([1.0, 2.0]), t([3.0, -1.0])
    out, _ = run_kernel("breadcrumbs_ties", base, [a, b], per_model={"weight": [1.0, -1.0]}, density=1.0)
    # weighted: a = [1, 2], -b = [-3, 1] -> sums [-2, 3] -> gamma [-, +] -> [-3, 3]
    assert out.tolist() == [-3.0, 3.0]
