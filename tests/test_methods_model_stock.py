"""Model Stock: hand-computed t, invariants (identical -> theta1, orthogonal -> theta0, segment)."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import run_kernel, t

BASE = t([1.0, 1.0])


def test_two_models_cos_half_gives_two_thirds():
    a, b = t([1.0, 0.0]), t([0.5, math.sqrt(3) / 2])  # cos = 0.5 -> t = 2 * 0.5 / 1.5 = 2/3
    out, stats = run_kernel("model_stock", BASE, [BASE + a, BASE + b])
    torch.testing.assert_close(out, BASE + (2 / 3) * (a + b) / 2)
    assert stats["t"] == pytest.approx(2 / 3, abs=1e-6) and stats["cos"] == pytest.approx(0.5, abs=1e-6)


def test_identical_and_orthogonal():
    x = t([3.0, -2.0])
    out, _ = run_kernel("model_stock", BASE, [x, x, x])
    torch.testing.assert_close(out, x)
    out, _ = run_kernel("model_stock", BASE, [BASE + t([1.0, 0.0]), BASE + t([0.0, 2.0])])
    torch.testing.assert_close(out, BASE)
    out, _ = run_kernel("model_stock", BASE, [BASE, BASE])  # zero task vectors -> base, no NaN
    assert torch.equal(out, BASE)


def test_negative_cosine_clamped_or_not():
    a, b = t([1.0, 0.0]), t([-0.5, math.sqrt(3) / 2])  # cos = -0.5
    out, _ = run_kernel("model_stock", BASE, [BASE + a, BASE + b])
    torch.testing.assert_close(out, BASE)  # clamped to 0 -> t = 0
    out, _ = run_kernel("model_stock", BASE, [BASE + a, BASE + b], clamp_cos=False)
    tt = 2 * -0.5 / (1 - 0.5)  # = -2
    torch.testing.assert_close(out, BASE + tt * (a + b) / 2)
    # K = 2 and cos = -1: the denominator is 0 -> t = 0 rather than inf
    out, _ = run_kernel("model_stock", BASE, [BASE + a, BASE - a], clamp_cos=False)
    torch.testing.assert_close(out, BASE)


def test_angle_mean_hand_computed():
    base = torch.zeros(3)
    xs = [t([1.0, 0.0, 0.0]), t([0.0, 1.0, 0.0]), t([1.0, 1.0, 0.0]) / math.sqrt(2)]
    # cosines 0, 1/sqrt2, 1/sqrt2 -> mean sqrt2/3 ; angles pi/2, pi/4, pi/4 -> mean pi/3 -> cos 0.5
    c = math.sqrt(2) / 3
    out, _ = run_kernel("model_stock", base, xs)
    torch.testing.assert_close(out, (3 * c / (1 + 2 * c)) * sum(xs) / 3)
    out, _ = run_kernel("model_stock", base, xs, angle_mean=True)
    torch.testing.assert_close(out, 0.75 * sum(xs) / 3)


def test_filter_wise_rows_hand_computed():
    base = torch.zeros(2, 2)
    a = t([1.0, 0.0], [1.0, 0.0])
    b = t([0.0, 1.0], [0.5, math.sqrt(3) / 2])  # row 0: cos 0 -> t 0 ; row 1: cos 0.5 -> t 2/3
    out, _ = run_kernel("model_stock", base, [a, b], filter_wise=True)
    torch.testing.assert_close(out, torch.stack([torch.zeros(2), (2 / 3) * (a[1] + b[1]) / 2]))
    bias = t([1.0, 2.0])  # a 1-D tensor is one row even with filter_wise
    out, _ = run_kernel("model_stock", torch.zeros(2), [bias, bias], filter_wise=True)
    torch.testing.assert_close(out, bias)


def test_permutation_invariant_and_on_the_segment():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    common = torch.randn(4, 5, generator=g)
    xs = [base + common + 0.5 * torch.randn(4, 5, generator=g) for _ in range(3)]
    out, stats = run_kernel("model_stock", base, xs)
    out2, _ = run_kernel("model_stock", base, xs[::-1])
    torch.testing.assert_close(out, out2)
    mean = sum(xs) / 3
    torch.testing.assert_close(out, stats["t"] * mean + (1 - stats["t"]) * base)
    assert 0.0 <= stats["t"] <= 1.0
