"""SCE: hand-computed values, a plain-loop reference, METHODS.md §19 invariants."""

from __future__ import annotations

import pytest
import torch
from method_helpers import run_kernel, t


def _plain_sce(base: list[float], xs: list[list[float]], topk: float) -> list[float]:
    n, m = len(xs), len(base)
    taus = [[x[j] - base[j] for j in range(m)] for x in xs]
    if topk < 1:
        var = []
        for j in range(m):
            mu = sum(tk[j] for tk in taus) / n
            var.append(sum((tk[j] - mu) ** 2 for tk in taus) / n)
        k = int(sum(1 for v in var if v != 0) * topk)
        keep = set(sorted(range(m), key=lambda j: (-var[j], j))[:k])
        taus = [[tk[j] if j in keep else 0.0 for j in range(m)] for tk in taus]
    energy = [sum(v * v for v in tk) / m for tk in taus]
    tot = sum(energy)
    w = [e / tot for e in energy] if tot >= 1e-6 else [1 / n] * n
    sums = [sum(tk[j] for tk in taus) for j in range(m)]
    out = []
    for j in range(m):
        g = 1 if sums[j] >= 0 else -1
        num = sum(w[i] * taus[i][j] for i in range(n) if (taus[i][j] > 0) - (taus[i][j] < 0) == g)
        den = sum(w[i] for i in range(n) if (taus[i][j] > 0) - (taus[i][j] < 0) == g)
        out.append(base[j] + num / max(den, 1e-6))
    return out


def test_hand_computed():
    # energies 5 and 1 -> w = 5/6, 1/6 ; signs of sums [4, 0] -> [+, + (a zero sum counts as +)]
    out, stats = run_kernel("sce", torch.zeros(2), [t([3.0, -1.0]), t([1.0, 1.0])])
    torch.testing.assert_close(out, t([8 / 3, 1.0]))
    assert stats["weights"] == pytest.approx([5 / 6, 1 / 6])


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.2])
def test_matches_plain_reference(topk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, generator=g)
    xs = [base + torch.randn(2, 3, generator=g) for _ in range(3)]
    out, stats = run_kernel("sce", base, xs, select_topk=topk)
    want = _plain_sce(base.reshape(-1).tolist(), [x.reshape(-1).tolist() for x in xs], topk)
    torch.testing.assert_close(out, torch.tensor(want).reshape(2, 3))
    assert sum(stats["weights"]) == pytest.approx(1.0)


def test_invariants():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, generator=g)
    x = base + torch.randn(3, 4, generator=g)
    out, _ = run_kernel("sce", base, [x])
    torch.testing.assert_close(out, x)  # N = 1, select_topk = 1 -> theta1
    out, _ = run_kernel("sce", base, [x, x], select_topk=0.5)
    assert torch.equal(out, base)  # identical models, select_topk < 1 -> zero variance -> base (documented)
    xs = [base + torch.randn(3, 4, generator=g) for _ in range(3)]
    a, _ = run_kernel("sce", base, xs, select_topk=0.6)
    b, _ = run_kernel("sce", base, xs[::-1], select_topk=0.6)
    torch.testing.assert_close(a, b)
    out, stats = run_kernel("sce", base, [base, base])  # zero task vectors: uniform weights, base
    assert torch.equal(out, base) and stats["weights"] == [0.5, 0.5]


def test_model_weights_are_ignored():
    xs = [t([3.0, -1.0]), t([1.0, 1.0])]
    a, _ = run_kernel("sce", torch.zeros(2), xs)
    b, _ = run_kernel("sce", torch.zeros(2), xs, per_model={"weight": [0.1, 5.0]})
    assert torch.equal(a, b)
