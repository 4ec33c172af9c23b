"""Logit fusion maths on plain tensors: the static combine, KL divergences and the dynamic weight solver.

Notation (after Fan et al., 2024, "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits
Fusion", Sec. 3.1-3.3 and Appendix "Pseudo Code"): at one decoding step M^L are the large model's logits,
M^S the small base's, M^S_t the t-th small expert's; P, Q, Q_t their softmax distributions. The fused
distribution is

    P~(alpha) = softmax( M^L + sum_t alpha_t (M^S_t - M^S) ).

Static mode uses fixed alpha (proxy tuning / weak-to-strong logit arithmetic). Dynamic mode picks alpha per
step by minimising the paper's distance-matching objective

    L(alpha) = sum_t [ (KL(P~||P) - KL(Q_t||Q))^2 + (KL(P||P~) - KL(Q||Q_t))^2 ]

over a grid of candidates (alpha_t in {0, step, ..., alpha_max}; one expert active at a time, or the full
product grid), subject to the hard trust-region constraint KL(P~||P) <= budget, where budget is by default
max_t KL(Q_t||Q): the large model may move away from its own next-token distribution at most as far as the
furthest expert moved from the small base. alpha = 0 (KL = 0) is always feasible. The constraint is this
project's explicit reading of the paper's "KL-constrained" problem (the paper's Eq. matches the KLs in a
squared loss only); `max_kl=None` turns it off and leaves the paper's objective alone.

All sums run in float64 (a vocabulary of 150k entries loses digits in float32 sums).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

SEARCHES = ("one_expert", "joint")
CHUNK = 256  # candidates evaluated at once at most (C x V float64 temporaries)
CHUNK_ELEMENTS = 1 << 24  # and at most this many candidate x vocabulary entries (128 MB per temporary)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=p.dtype, device=p.device))
    return term.sum(-1)


def kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension."""
    return kl_from_logprobs(log_probs(logits_p), log_probs(logits_q))


def static_fuse(
    large: torch.Tensor, small_base: torch.Tensor, experts: torch.Tensor, weights
) -> torch.Tensor:
    """M^L + sum_t w_t (M^S_t - M^S); `experts` is (T, V), `weights` T numbers. Returns float64 (V,)."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=large.device)
    deltas = experts.to(torch.float64) - small_base.to(torch.float64)
    return large.to(torch.float64) + w @ deltas


def candidate_grid(
    n_experts: int, alpha_max: float = 2.0, step: float = 0.1, search: str = "one_expert"
) -> torch.Tensor:
    """The alpha candidates, (C, T) float64, the all-zero row first and rows in increasing order.

    one_expert: alpha has one nonzero entry (the paper's multi-task shortcut: T searches of one alpha);
    joint: every combination (len(values) ** T rows).
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}")
    if not (alpha_max > 0 and step > 0):
        raise ValueError("alpha_max and step must be > 0")
    n = int(round(alpha_max / step))
    values = [round(i * step, 12) for i in range(n + 1)]
    if search == "joint":
        rows = [list(r) for r in itertools.product(values, repeat=n_experts)]
    else:
        rows = [[0.0] * n_experts]
        for t in range(n_experts):
            for v in values[1:]:
                r = [0.0] * n_experts
                r[t] = v
                rows.append(r)
    return torch.tensor(rows, dtype=torch.float64)


@dataclass
class DynamicStep:
    """What the solver decided at one step, with the quantities it used (all floats, JSON-ready)."""

    weights: list[float]
    kl_fused_large: float  # KL(P~ || P) at the chosen weights
    kl_large_fused: float  # KL(P || P~)
    kl_expert_base: list[float]  # KL(Q_t || Q), the targets for KL(P~||P)
    kl_base_expert: list[float]  # KL(Q || Q_t), the targets for KL(P||P~)
    budget: float | None  # the bound on KL(P~||P); None when unconstrained
    loss: float
    feasible: int  # candidates that met the bound

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _objective(f, r, a, b):
    return ((f[:, None] - a[None, :]) ** 2 + (r[:, None] - b[None, :]) ** 2).sum(1)


def solve_dynamic(
    large: torch.Tensor,
    small_base: torch.Tensor,
    experts: torch.Tensor,
    grid: torch.Tensor,
    max_kl: float | str | None = "auto",
) -> tuple[torch.Tensor, DynamicStep]:
    """Pick the grid row minimising L(alpha) among those with KL(P~||P) <= budget.

    `max_kl`: "auto" (budget = max_t KL(Q_t||Q)), a number, or None (no bound). Ties go to the earliest
    row (the smallest weights). Returns the fused logits (float64, V) and the step record.
    """
    dev = large.device
    big = large.to(torch.float64)
    logP = log_probs(big)
    logQ = log_probs(small_base)
    logQt = log_probs(experts)
    a = kl_from_logprobs(logQt, logQ[None, :])  # (T,) KL(Q_t||Q)
    b = kl_from_logprobs(logQ[None, :].expand_as(logQt), logQt)  # (T,) KL(Q||Q_t)
    if max_kl == "auto":
        budget = float(a.max())
    elif max_kl is None:
        budget = None
    else:
        budget = float(max_kl)
    deltas = experts.to(torch.float64) - small_base.to(torch.float64)[None, :]
    grid = grid.to(device=dev, dtype=torch.float64)
    best = (float("inf"), -1, 0.0, 0.0)
    feasible = 0
    chunk = max(1, min(CHUNK, CHUNK_ELEMENTS // max(1, big.shape[-1])))
    for s in range(0, grid.shape[0], chunk):
        g = grid[s : s + chunk]
        logPt = log_probs(big[None, :] + g @ deltas)
        f = kl_from_logprobs(logPt, logP[None, :])
        r = kl_from_logprobs(logP[None, :].expand_as(logPt), logPt)
        loss = _objective(f, r, a, b)
        if budget is not None:
            ok = f <= budget
            loss = torch.where(ok, loss, torch.full_like(loss, float("inf")))
            feasible += int(ok.sum())
        else:
            feasible += int(loss.numel())
        i = int(torch.argmin(loss))
        if float(loss[i]) < best[0] or best[1] < 0:
            best = (float(loss[i]), s + i, float(f[i]), float(r[i]))
    loss_v, idx, f_v, r_v = best
    alpha = grid[idx]
    fused = big + alpha @ deltas
    step = DynamicStep(
        weights=[float(x) for x in alpha],
        kl_fused_large=f_v,
        kl_large_fused=r_v,
        kl_expert_base=[float(x) for x in a],
        kl_base_expert=[float(x) for x in b],
        budget=budget,
        loss=loss_v,
        feasible=feasible,
    )
    return fused, step
