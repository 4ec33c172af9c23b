"""Streaming statistics of task vectors (tau_i = expert_i - base), summed piece by piece.

`Acc` holds sums only, so pieces of a tensor, tensors of a layer and layers of a model add up exactly:

- norms: sum tau_i^2 (and sum base^2 for the relative norm |tau_i| / |base|), L1 mass sum |tau_i|;
- pairwise: the dot product tau_i . tau_j (cosine = dot / (|tau_i| |tau_j|) of the concatenated vectors),
  and among entries where both are non-zero, how many have opposite signs (the sign-conflict rate);
- concentration: the L1 mass held by the largest 1/5/20% of |tau_i| *within each tensor* (a tensor read
  in pieces: within each piece), so a group's share is (sum of those masses) / (sum of L1 masses);
- the method's effect (when its kernel ran on the piece): kept entries per expert (the kernel's own
  `kept_fraction`), and the elected-sign agreement: among entries where tau_i and the merged delta
  (merged - base) are both non-zero, the share with the same sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

TOP_SHARES = (0.01, 0.05, 0.2)  # the mass held by the largest 1%, 5% and 20% of magnitudes


BLOCK = 1 << 16  # columns per fp32 product: short fp32 sums (~1e-7 relative), added up in float64; sign
# counts (sums of +-1/0) are exact in fp32 below 2^24 terms
SAMPLE = 1 << 15  # entries sampled to bracket a top-k threshold


def top_mass(a: torch.Tensor, shares=TOP_SHARES) -> list[float]:
    """Sum of the largest ceil(p * n) values of a (non-negative, flat), for each p in shares: exact.

    Only the candidates at or above a threshold are sorted: a sorted sample of SAMPLE entries (fixed seed)
    gives a value below the largest share's k-th largest with a wide margin, so every top entry is among the
    candidates; if the count says otherwise (very unlikely), the whole tensor is sorted instead."""
    n = a.numel()
    if n == 0:
        return [0.0] * len(shares)
    ks = [min(n, math.ceil(p * n)) for p in shares]
    k = max(ks)
    cand = a
    if n > 4 * SAMPLE:
        g = torch.Generator(device=a.device).manual_seed(n)
        sample = torch.sort(
            a[torch.randint(n, (SAMPLE,), generator=g, device=a.device)], descending=True
        ).values
        q = k / n
        lo = sample[min(SAMPLE - 1, int(q * SAMPLE + 6 * math.sqrt(SAMPLE * q * (1 - q)) + 16))]
        if a.device.type == "cpu":  # numpy's masks and sort are vectorised (many times torch's on the CPU)
            an = a.numpy()
            cand = an[an >= float(lo)]
            csum = np.cumsum(np.sort(cand if cand.size >= k else an)[::-1][:k], dtype=np.float64)
            return [float(csum[j - 1]) for j in ks]
        cand = a[a >= lo]
        if cand.numel() < k:
            cand = a
    if cand.device.type == "cpu":
        csum = np.cumsum(np.sort(cand.numpy())[::-1][:k], dtype=np.float64)
    else:
        csum = torch.cumsum(torch.sort(cand, descending=True).values[:k], 0, dtype=torch.float64)
    return [float(csum[j - 1]) for j in ks]


@dataclass
class Acc:
    """Sums over some set of entries (a piece, a tensor, a layer, a module group, the whole model)."""

    n: int  # experts
    numel: int = 0
    base_sq: float = 0.0
    sq: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    top: list[list[float]] = field(default_factory=list)  # [expert][share]
    dot: list[list[float]] = field(default_factory=list)  # [i][j]
    both: list[list[int]] = field(default_factory=list)  # entries where tau_i and tau_j are both non-zero
    opp: list[list[int]] = field(default_factory=list)  # ... and have opposite signs
    # the method's effect, over the entries of the tensors its kernel ran on
    eff_numel: int = 0
    kept: list[float] = field(default_factory=list)  # kept entries (kept_fraction * numel)
    kept_numel: int = 0  # entries of the tensors whose kernel reported kept_fraction
    agree: list[int] = field(default_factory=list)
    agree_den: list[int] = field(default_factory=list)
    merged_sq: float = 0.0  # sum (merged - base)^2
    conflict: float = 0.0  # the kernel's own sign_conflict_rate, weighted by entries
    conflict_numel: int = 0

    def __post_init__(self):
        n = self.n
        for name, make in (
            ("sq", lambda: [0.0] * n),
            ("l1", lambda: [0.0] * n),
            ("top", lambda: [[0.0] * len(TOP_SHARES) for _ in range(n)]),
            ("dot", lambda: [[0.0] * n for _ in range(n)]),
            ("both", lambda: [[0] * n for _ in range(n)]),
            ("opp", lambda: [[0] * n for _ in range(n)]),
            ("kept", lambda: [0.0] * n),
            ("agree", lambda: [0] * n),
            ("agree_den", lambda: [0] * n),
        ):
            if not getattr(self, name):
                setattr(self, name, make())

    # -- gathering ---------------------------------------------------------------------------------
    def add_piece(self, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        """Add one piece (flat or shaped; base and every expert alike, float32). Returns the task vectors
        as the rows of one (experts x entries) tensor."""
        b = base.reshape(-1)
        taus = torch.stack([x.reshape(-1) for x in xs]).sub_(b)
        n, m = self.n, b.numel()
        gram = torch.zeros(n, n, dtype=torch.float64)
        same = torch.zeros(n, n, dtype=torch.int64)  # (same signs) - (opposite signs), both non-zero
        both = torch.zeros(n, n, dtype=torch.int64)
        base_sq = torch.zeros((), dtype=torch.float64)
        for s in range(0, m, BLOCK):  # Gram matrices: every norm, dot and sign count in one sweep
            t, bb = taus[:, s : s + BLOCK], b[s : s + BLOCK]
            gram += (t @ t.T).cpu().double()
            base_sq += float(torch.dot(bb, bb))
            sg = torch.sign(t)
            same += (sg @ sg.T).round().long().cpu()
            sg.abs_()
            both += (sg @ sg.T).round().long().cpu()
        self.numel += m
        self.base_sq += float(base_sq)
        for i in range(n):
            self.sq[i] += float(gram[i, i])
            for j in range(n):
                if i != j:
                    self.dot[i][j] += float(gram[i, j])
                    self.both[i][j] += int(both[i, j])
                    self.opp[i][j] += int((both[i, j] - same[i, j]) // 2)
        mags = taus.abs()
        for i in range(self.n):
            self.l1[i] += float(mags[i].sum())
            for k, m in enumerate(top_mass(mags[i])):
                self.top[i][k] += m
        return taus

    def add_effect(
        self, base: torch.Tensor, taus: torch.Tensor, merged: torch.Tensor, stats: dict[str, Any]
    ) -> None:
        """Add what the method's kernel did on this piece: its output and the statistics it reported."""
        n = base.numel()
        delta = merged.reshape(-1).to(base.dtype) - base.reshape(-1)
        self.eff_numel += n
        same = torch.zeros(self.n, dtype=torch.int64)
        den = torch.zeros(self.n, dtype=torch.int64)
        for s in range(0, n, BLOCK):
            d = delta[s : s + BLOCK]
            self.merged_sq += float(torch.dot(d, d))
            d = torch.sign(d)
            sg = torch.sign(taus[:, s : s + BLOCK])
            same += (sg @ d).round().long().cpu()
            den += (sg.abs_() @ d.abs()).round().long().cpu()
        for i in range(self.n):
            self.agree_den[i] += int(den[i])
            self.agree[i] += int((den[i] + same[i]) // 2)
        kf = stats.get("kept_fraction")
        if isinstance(kf, list) and len(kf) == self.n:
            self.kept_numel += n
            for i, f in enumerate(kf):
                self.kept[i] += float(f) * n
        if "sign_conflict_rate" in stats:
            self.conflict += float(stats["sign_conflict_rate"]) * n
            self.conflict_numel += n

    def merge(self, o: Acc) -> None:
        """Add another accumulator's sums into this one."""
        for name in (
            "numel",
            "base_sq",
            "eff_numel",
            "kept_numel",
            "merged_sq",
            "conflict",
            "conflict_numel",
        ):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        for name in ("sq", "l1", "kept", "agree", "agree_den"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(o, name))])
        for name in ("top", "dot", "both", "opp"):
            setattr(
                self,
                name,
                [[a + b for a, b in zip(r, s)] for r, s in zip(getattr(self, name), getattr(o, name))],
            )

    # -- results -----------------------------------------------------------------------------------
    def norm(self, i: int) -> float:
        return math.sqrt(self.sq[i])

    def rel_norm(self, i: int) -> float | None:
        return self.norm(i) / math.sqrt(self.base_sq) if self.base_sq > 0 else None

    def cosine(self, i: int, j: int) -> float | None:
        d = math.sqrt(self.sq[i] * self.sq[j])
        return self.dot[i][j] / d if d > 0 else None

    def conflict_rate(self, i: int, j: int) -> float | None:
        return self.opp[i][j] / self.both[i][j] if self.both[i][j] else None

    def top_share(self, i: int) -> list[float | None]:
        return [m / self.l1[i] if self.l1[i] > 0 else None for m in self.top[i]]

    def to_json(self, labels: list[str]) -> dict[str, Any]:
        """Figures per expert and per pair, rounded for the report (None where undefined)."""

        def r(x):  # 7 significant digits
            return None if x is None else float(f"{x:.7g}")

        experts = {}
        for i, lab in enumerate(labels):
            e = {
                "norm": r(self.norm(i)),
                "rel_norm": r(self.rel_norm(i)),
                "top_mass": {f"{round(p * 100)}%": r(s) for p, s in zip(TOP_SHARES, self.top_share(i))},
            }
            if self.kept_numel:
                e["kept_fraction"] = r(self.kept[i] / self.kept_numel)
            if self.agree_den[i]:
                e["sign_agreement"] = r(self.agree[i] / self.agree_den[i])
            experts[lab] = e
        pairs = [
            {"a": labels[i], "b": labels[j], "cosine": r(self.cosine(i, j)),
             "sign_conflict": r(self.conflict_rate(i, j))}
            for i in range(self.n) for j in range(i + 1, self.n)
        ]  # fmt: skip
        out: dict[str, Any] = {"numel": self.numel, "experts": experts, "pairs": pairs}
        if self.eff_numel and self.base_sq > 0:
            out["merged_rel_norm"] = r(math.sqrt(self.merged_sq / self.base_sq))
        if self.conflict_numel:
            out["method_sign_conflict"] = r(self.conflict / self.conflict_numel)
        return out
