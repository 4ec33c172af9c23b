"""Generalized task arithmetic: the shared back half of dare_*, breadcrumbs_* and della_* (METHODS.md §4-6).

    tau_i  = theta_i - theta0                       (task vectors)
    tau~_i = sparsify_i(tau_i)                      (method-specific: random, magnitude band, ranked random)
    mixed  = sum_i w_i tau~_i                        (no consensus)
           | sum_i w_i tau~_i [sign(tau~_i) = gamma] (consensus "sum": gamma = elected sign of sum_i w_i tau~_i)
    mixed /= divisor if normalize                    (sum_i w_i, or sum_i w_i [agree] per element; 0 -> 1)
    theta  = theta0 + lambda * mixed

Sign election (an exact zero sum counts as +) and the disjoint merge are ties.py's. The sparsifiers' rescale rules live here too, so DARE
and DELLA share them: "inv_p" divides each kept entry by its keep probability (the papers, so E[tau~] = tau);
"l1" multiplies the tensor by ||tau||_1 / ||m * tau||_1 (mergekit since a2dda31; skipped when either norm
is below 1e-7); "none" keeps the surviving entries as they are.
"""

from __future__ import annotations

from typing import Literal

import torch

from merge_cli.methods.base import TensorCtx
from merge_cli.methods.ties import disjoint_merge, elect_sign, trim

Rescale = Literal["inv_p", "l1", "none"]
L1_EPS = 1e-7


def rescale_bool(v):
    """mergekit writes `rescale: true|false`; true is its L1-norm rescale, false none."""
    if v is True:
        return "l1"
    if v is False:
        return "none"
    return v


def apply_mask(delta: torch.Tensor, keep: torch.Tensor, prob: torch.Tensor | float, how: str) -> torch.Tensor:
    """Zero the dropped entries of `delta` and rescale the kept ones (`prob` = keep probability)."""
    kept = delta * keep
    if how == "inv_p":
        if isinstance(prob, float):
            return kept / prob if prob > 0 else torch.zeros_like(delta)
        return torch.where(
            keep, delta / prob.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta)
        )
    if how == "l1":
        before = float(delta.abs().sum())
        after = float(kept.abs().sum())
        if before >= L1_EPS and after >= L1_EPS:
            return kept * (before / after)
    return kept


def combine(
    base: torch.Tensor,
    sparse: torch.Tensor,
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    ctx: TensorCtx,
    trim_density: float = 1.0,
) -> torch.Tensor:
    """sparse: [N, ...] sparsified task vectors. Optional TIES magnitude trim (trim_density < 1), then merge."""
    if trim_density < 1.0:
        sparse = torch.stack([trim(s, trim_density) for s in sparse])
    n = sparse.shape[0]
    w = torch.tensor(weights, dtype=sparse.dtype, device=sparse.device)
    wb = w.reshape(-1, *([1] * (sparse.dim() - 1)))
    if consensus:
        # agreement is judged on sign(w_i tau~_i) as in mergekit: pass sign(w_i) tau~_i with weights |w_i|
        # (identical for positive weights; a negative weight counts |w_i| in the disjoint mean's divisor)
        positive = elect_sign(sparse * wb) > 0
        signed = list(sparse * torch.sign(wb))
        stats = {"kept": [0] * n, "touched": 0, "conflict": 0}
        mixed = disjoint_merge(
            signed, [abs(x) for x in weights], positive, "mean" if normalize else "sum", stats
        )
        ctx.stats["sign_conflict_rate"] = stats["conflict"] / max(stats["touched"], 1)
    else:
        mixed = (sparse * wb).sum(dim=0)
        if normalize:
            s = float(w.sum())
            mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
    nz = sparse.reshape(n, -1) != 0
    ctx.stats["kept_fraction"] = [float(x) for x in nz.float().mean(dim=1)]
    return base + lambda_ * mixed
