"""nearswap and arcee_fusion: hand values and a plain-math reference (exact quantiles)."""

from __future__ import annotations

import math

import torch
from method_helpers import run_kernel, t

from merge_cli.methods.arcee_fusion import quantile


def test_nearswap_hand_computed():
    base, other = torch.zeros(4), t([0.005, 0.02, -0.1, 0.0])
    out, stats = run_kernel("nearswap", base, [other], t=0.01)
    # w = clamp(0.01 / |diff|, 0, 1) = 1, 0.5, 0.1, 1
    torch.testing.assert_close(out, t([0.005, 0.01, -0.01, 0.0]))
    assert stats["swapped_fraction"] == 0.5
    out, _ = run_kernel("nearswap", base, [other], t=0.0)
    assert torch.equal(out, base)


def test_nearswap_needs_t_at_plan_time(family, tmp_path):
    from helpers import run_cli, write_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "base_model": str(family["base"]),
            "models": [{"model": str(family["expert0"])}],
            "method": "nearswap",
        },
    )
    res = run_cli("plan", recipe)
    assert res.exit_code == 2 and "'t'" in res.stderr and "Traceback" not in res.stderr


def _plain_quantile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _plain_fusion(base: list[list[float]], other: list[list[float]]) -> list[list[float]]:
    imp = []
    for a, b in zip(base, other, strict=True):
        za, zb = sum(math.exp(v) for v in a), sum(math.exp(v) for v in b)
        p, q = [math.exp(v) / zb for v in b], [math.exp(v) / za for v in a]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        imp.append([abs(y - x) * kl for x, y in zip(a, b, strict=True)])
    flat = [v for row in imp for v in row]
    thr = _plain_quantile(flat, 0.5) + 1.5 * (_plain_quantile(flat, 0.75) - _plain_quantile(flat, 0.25))
    return [
        [y if i >= thr else x for x, y, i in zip(a, b, r, strict=True)]
        for a, b, r in zip(base, other, imp, strict=True)
    ]


def test_arcee_fusion_matches_plain_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    other = base + 0.3 * torch.randn(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < 0.3)
    out, stats = run_kernel("arcee_fusion", base, [other])
    want = torch.tensor(_plain_fusion(base.tolist(), other.tolist()))
    torch.testing.assert_close(out, want)
    assert 0 < stats["kept_fraction"][0] < 1
    out, _ = run_kernel("arcee_fusion", base, [base.clone()])
    assert torch.equal(out, base)


def test_exact_quantile_matches_torch_quantile():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.25, 0.5, 0.75, 1.0, 0.33):
        assert abs(quantile(x, q) - float(torch.quantile(x, q))) < 1e-6
    assert quantile(t([1.0, 2.0, 3.0, 10.0]), 0.5) == 2.5
