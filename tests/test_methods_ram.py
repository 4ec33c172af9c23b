"""RAM and RAM+ (ramplus_tl): hand-computed values."""

from __future__ import annotations

import pytest
import torch
from method_helpers import run_kernel, t

BASE = t([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
TAU1 = t([0.5, 0.0, 0.2, 0.0, 0.3, 1e-7])  # unique at 2 and 4, shared at 0; 1e-7 is below epsilon
TAU2 = t([0.3, 0.0, 0.0, -0.4, 0.0, 0.0])  # shared at 0, unique at 3


def test_ram_hand_computed():
    out, stats = run_kernel("ram", BASE, [BASE + TAU1, BASE + TAU2])
    torch.testing.assert_close(out, BASE + t([0.4, 0.0, 0.2, -0.4, 0.3, 0.0]))
    assert stats["shared_fraction"] == pytest.approx(1 / 6)


def test_ramplus_hand_computed():
    # model 1: 2 unique, 1 shared -> ratio 0.5 ; model 2: 1 unique, 1 shared -> ratio 1 (clipped to alpha)
    out, stats = run_kernel("ramplus_tl", BASE, [BASE + TAU1, BASE + TAU2], r=0.5, alpha=0.8)
    s1, s2 = 1 + 0.5 * 0.5, 1 + 0.5 * 0.8
    torch.testing.assert_close(out, BASE + t([0.4, 0.0, 0.2 * s1, -0.4 * s2, 0.3 * s1, 0.0]))
    assert stats["unique_scale"] == pytest.approx([s1, s2])
    out, _ = run_kernel("ramplus_tl", BASE, [BASE + TAU1, BASE + TAU2])  # defaults r 0.1, alpha 0.2
    torch.testing.assert_close(out, BASE + t([0.4, 0.0, 0.2 * 1.02, -0.4 * 1.02, 0.3 * 1.02, 0.0]))


def test_ram_invariants():
    x = t([2.0, -1.0, 0.0, 3.0])
    out, _ = run_kernel("ram", torch.zeros(4), [x])
    torch.testing.assert_close(out, x)
    out, _ = run_kernel("ram", torch.zeros(4), [x, x, x])
    torch.testing.assert_close(out, x)
    out, _ = run_kernel("ramplus_tl", torch.ones(4), [torch.ones(4), torch.ones(4)])
    assert torch.equal(out, torch.ones(4))
