"""slerp, nuslerp, multislerp, karcher: hand values, a plain-math reference, METHODS.md §19 invariants."""

from __future__ import annotations

import math

import pytest
import torch
from method_helpers import run_kernel, t


def _plain_slerp(tt: float, v0: list[float], v1: list[float]) -> list[float]:
    n0 = math.sqrt(sum(x * x for x in v0))
    n1 = math.sqrt(sum(x * x for x in v1))
    u0 = [x / n0 for x in v0] if n0 > 1e-8 else v0
    u1 = [x / n1 for x in v1] if n1 > 1e-8 else v1
    dot = max(-1.0, min(1.0, sum(a * b for a, b in zip(u0, u1, strict=True))))
    if abs(dot) > 0.9995:
        return [(1 - tt) * a + tt * b for a, b in zip(v0, v1, strict=True)]
    om = math.acos(dot)
    c0, c1 = math.sin((1 - tt) * om) / math.sin(om), math.sin(tt * om) / math.sin(om)
    return [c0 * a + c1 * b for a, b in zip(v0, v1, strict=True)]


def _slerp(tt, a, b):
    return run_kernel("slerp", a, [b], t=tt)[0]


def test_slerp_hand_computed():
    r = math.sqrt(2) / 2
    torch.testing.assert_close(_slerp(0.5, t([1.0, 0.0]), t([0.0, 1.0])), t([r, r]))
    # unequal norms: the unnormalised inputs are combined, so the norm is not preserved
    torch.testing.assert_close(_slerp(0.5, t([2.0, 0.0]), t([0.0, 1.0])), t([2 * r, r]))


def test_slerp_matches_plain_reference_and_endpoints():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for tt in (0.0, 0.3, 0.5, 1.0):
        want = torch.tensor(_plain_slerp(tt, a.reshape(-1).tolist(), b.reshape(-1).tolist())).reshape(2, 3)
        torch.testing.assert_close(_slerp(tt, a, b), want)
    torch.testing.assert_close(_slerp(0.0, a, b), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(_slerp(1.0, a, b), b, atol=1e-6, rtol=0)
    torch.testing.assert_close(_slerp(0.3, a, b), _slerp(0.7, b, a))
    c = b * (a.norm() / b.norm())
    assert float(_slerp(0.37, a, c).norm()) == pytest.approx(float(a.norm()), rel=1e-5)


def test_slerp_degenerate_inputs_have_no_nan():
    a = t([1.0, 2.0, 3.0])
    for other in (torch.zeros(3), -a, 2 * a, a + 1e-7):
        out = _slerp(0.4, a, other)
        assert torch.isfinite(out).all()
    torch.testing.assert_close(_slerp(0.25, a, 2 * a), 1.25 * a)  # parallel -> lerp
    torch.testing.assert_close(_slerp(0.5, a, -a), torch.zeros(3))  # antiparallel -> lerp through 0


def test_nuslerp_t_from_weights_and_task_vectors():
    base = t([1.0, 1.0])
    a, b = t([2.0, 1.0]), t([1.0, 3.0])
    out, stats = run_kernel("nuslerp", None, [a, b], per_model={"weight": [3.0, 1.0]})
    assert stats["t"] == 0.25
    torch.testing.assert_close(out, torch.tensor(_plain_slerp(0.25, a.tolist(), b.tolist())))
    out, _ = run_kernel("nuslerp", base, [a, b], per_model={"weight": [1.0, 1.0]})
    r = math.sqrt(2) / 2  # task vectors [1, 0] and [0, 2], t = 0.5, angle pi/2
    torch.testing.assert_close(out, base + t([r, 2 * r]))
    out, stats = run_kernel("nuslerp", None, [a, b], per_model={"weight": [1.0, -1.0]})
    assert stats["t"] == 0.5


def test_nuslerp_per_vector_modes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    w = {"weight": [0.6, 0.4]}
    rows, _ = run_kernel("nuslerp", None, [a, b], per_model=w, nuslerp_flatten=False)
    want = torch.tensor([_plain_slerp(0.4, x.tolist(), y.tolist()) for x, y in zip(a, b, strict=True)])
    torch.testing.assert_close(rows, want)
    cols, _ = run_kernel("nuslerp", None, [a, b], per_model=w, nuslerp_flatten=False, nuslerp_row_wise=True)
    want = torch.tensor([_plain_slerp(0.4, x.tolist(), y.tolist()) for x, y in zip(a.T, b.T, strict=True)]).T
    torch.testing.assert_close(cols, want)


def test_multislerp_hand_computed():
    a, b = t([3.0, 0.0]), t([0.0, 1.0])
    out, _ = run_kernel("multislerp", None, [a, b], per_model={"weight": [1.0, 3.0]})
    # weights 1/4, 3/4: direction normalise([0.25, 0.75]) ; norm 0.25 * 3 + 0.75 * 1 = 1.5
    d = t([0.25, 0.75]) / math.sqrt(0.25**2 + 0.75**2)
    torch.testing.assert_close(out, 1.5 * d)
    base = t([1.0, -1.0])
    out, _ = run_kernel("multislerp", base, [base + a, base + b], per_model={"weight": [1.0, 3.0]})
    torch.testing.assert_close(out, base + 1.5 * d)
    x = t([0.5, -2.0])
    out, _ = run_kernel("multislerp", None, [x, x, x])
    torch.testing.assert_close(out, x)


def _karcher(xs, **kw):
    return run_kernel("karcher", None, xs, **kw)


def test_karcher_single_identical_and_two_equal_norms():
    x = t([1.0, -2.0, 0.5])
    torch.testing.assert_close(_karcher([x])[0], x)
    torch.testing.assert_close(_karcher([x, x, x])[0], x)
    a, b = t([2.0, 0.0, 0.0]), t([0.0, 0.0, 2.0])
    torch.testing.assert_close(_karcher([a, b])[0], _slerp(0.5, a, b))


def test_karcher_is_a_stationary_point_and_keeps_the_mean_norm():
    # three well-separated directions: at the Karcher mean u, sum_i log_u(u_i) = 0 (plain math check)
    xs = [t([3.0, 0.2, 0.1]), t([0.1, 2.0, 0.3]), t([0.5, 0.4, 1.0])]
    out, stats = _karcher(xs, max_iter=50, tol=1e-7)
    norms = [math.sqrt(sum(v * v for v in x.tolist())) for x in xs]
    assert float(out.norm()) == pytest.approx(sum(norms) / 3, rel=1e-5)
    u = (out / out.norm()).tolist()
    grad = [0.0, 0.0, 0.0]
    for x, n in zip(xs, norms, strict=True):
        ui = [v / n for v in x.tolist()]
        c = sum(p * q for p, q in zip(u, ui, strict=True))
        phi = math.acos(max(-1.0, min(1.0, c)))
        for k in range(3):
            grad[k] += phi / math.sin(phi) * (ui[k] - c * u[k])
    assert math.sqrt(sum(g * g for g in grad)) < 1e-4
    assert stats["iterations"] > 1
    torch.testing.assert_close(_karcher(xs[::-1], max_iter=50, tol=1e-7)[0], out, atol=1e-5, rtol=1e-5)


def test_karcher_zero_inputs():
    x = t([1.0, 2.0])
    out, _ = _karcher([x, torch.zeros(2)])
    torch.testing.assert_close(out, x / 2)  # direction of x, mean norm |x| / 2
    out, _ = _karcher([torch.zeros(2), torch.zeros(2)])
    assert torch.equal(out, torch.zeros(2))
    out, _ = _karcher([x, -x])
    assert torch.isfinite(out).all()
