"""Generalized task arithmetic: the shared back half of dare_*, breadcrumbs_* and della_* (METHODS.md §4-6).

    tau_i  = theta_i - theta0                       (task vectors)
    tau~_i = rescale(m_i * tau_i)                    (m_i: the family's keep mask: random, magnitude band, ...)
    tau~_i = trim(tau~_i, trim_density)              (dare_ties as in MergeLM only)
    mixed  = sum_i w_i tau~_i                        (no consensus)
           | sum_i w_i tau~_i [sign(w_i tau~_i) = gamma]   (consensus: gamma = sign of sum_i w_i tau~_i, 0 -> +)
    mixed /= divisor if normalize                    (sum_i w_i, or sum_i |w_i| [agree] per element; 0 -> 1)
    theta  = theta0 + lambda * mixed

Sign election and the disjoint merge are ties.py's. Rescale rules: "inv_p" divides each kept entry by its
keep probability (the papers, so E[tau~] = tau); "l1" multiplies the tensor by ||tau||_1 / ||m * tau||_1
(mergekit since a2dda31; skipped when either norm is below 1e-7; sums in float64); "none" keeps survivors.

A family gives keep(i, tau, params, ctx) -> (mask or None = keep all, keep probability): it must depend only
on the rows it is given (rows are never split) and on ctx.offset-aware random draws, so huge tensors can be
merged in row chunks (`stream`): l1 norms, tensor-level magnitude bands and the TIES trim are gathered in
statistics passes with the exact radix top-k of selection.py, giving the same result as the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from merge_cli.methods.base import ParamSet, Streamed, TensorCtx
from merge_cli.methods.consensus import disjoint_merge, elect, trim
from merge_cli.methods.selection import StreamingTopK, mask_from_threshold, topk_mask_2d
from merge_cli.methods.task_arithmetic import weighted_sum

Rescale = Literal["inv_p", "l1", "none"]
L1_EPS = 1e-7
Keep = Callable[
    [int, torch.Tensor, ParamSet, TensorCtx], tuple[torch.Tensor | None, float | torch.Tensor | None]
]
Band = Callable[
    [int, ParamSet, tuple[int, ...]], tuple[int, int] | None
]  # tensor-level (k kept+removed, k removed)


def rescale_bool(v):
    """mergekit writes `rescale: true|false`; true is its L1-norm rescale, false none."""
    if v is True:
        return "l1"
    if v is False:
        return "none"
    return v


def l1_sums(tau: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    return float(tau.abs().double().sum()), float((tau * keep).abs().double().sum())


def l1_factor(before: float, after: float) -> float | None:
    return before / after if before >= L1_EPS and after >= L1_EPS else None


def rescaled(tau, keep, prob, how: str, factor: float | None) -> torch.Tensor:
    """m * tau, rescaled: by 1/prob (inv_p), by the tensor's L1 factor (l1), or not at all."""
    if keep is None:
        return tau
    if how == "inv_p" and prob is not None:
        if isinstance(prob, float):
            return tau * keep / prob if prob > 0 else torch.zeros_like(tau)
        return torch.where(keep, tau / prob.clamp_min(torch.finfo(tau.dtype).tiny), torch.zeros_like(tau))
    kept = tau * keep
    return kept * factor if (how == "l1" and factor is not None) else kept


def band_mask(scores: torch.Tensor, k_hi: int, k_top: int) -> torch.Tensor:
    """Per row of a 2-D `scores`: the k_hi largest entries minus the k_top largest (k_top <= k_hi)."""
    return topk_mask_2d(scores, k_hi) & ~topk_mask_2d(scores, k_top)


def new_stats(n: int) -> dict:
    return {"kept": [0] * n, "touched": 0, "conflict": 0, "numel": 0}


def record(stats: dict, ctx: TensorCtx, consensus: bool) -> None:
    ctx.stats["kept_fraction"] = [k / max(stats["numel"], 1) for k in stats["kept"]]
    if consensus:
        ctx.stats["sign_conflict_rate"] = stats["conflict"] / max(stats["touched"], 1)


def combine(
    base, sparse: list[torch.Tensor], weights, *, consensus: bool, normalize: bool, lambda_: float, stats
):
    """Merge sparsified task vectors (a whole tensor or a chunk); accumulates counts into `stats`."""
    stats["numel"] += base.numel()
    if consensus:
        # agreement on sign(w_i tau~_i) as in mergekit: pass sign(w_i) tau~_i with weights |w_i|
        # sums by weighted_sum: products in the compute dtype, fp32 accumulation in bf16 (mergekit's rounding)
        sign = elect(sparse, weights, True)
        signed = [s if w >= 0 else -s for s, w in zip(sparse, weights, strict=True)]
        how = "mean" if normalize else "sum"
        mixed = disjoint_merge(signed, [abs(w) for w in weights], sign, how, stats)
    else:
        mixed = weighted_sum(sparse, list(weights), base)
        for i, s in enumerate(sparse):
            stats["kept"][i] += int(torch.count_nonzero(s))
        if normalize:
            tot = sum(weights)
            mixed = mixed / (tot if abs(tot) >= 1e-8 else 1.0)
    return base + lambda_ * mixed


def _how(p: ParamSet) -> str:
    return getattr(p, "rescale", "none")


def kernel(keep: Keep, consensus: bool):
    """The whole-tensor kernel of a family."""

    def run(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
        sparse = []
        for i, x in enumerate(tensors):
            tau = x - base
            m, prob = keep(i, tau, p, ctx)
            factor = l1_factor(*l1_sums(tau, m)) if (m is not None and _how(p) == "l1") else None
            s = rescaled(tau, m, prob, _how(p), factor)
            td = getattr(p, "trim_density", 1.0)
            sparse.append(trim(s, td) if td < 1.0 else s)
        stats = new_stats(len(tensors))
        out = combine(
            base, sparse, weights, consensus=consensus, normalize=p.normalize, lambda_=p.lambda_, stats=stats
        )
        record(stats, ctx, consensus)
        return out

    return run


class Sel:
    """Exact top-k of a tensor seen in chunks: radix passes, then masks applied in flat order."""

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.radix = StreamingTopK(k, n) if 0 < k < n else None
        self.thr, self.seen = None, 0

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.radix is None:
            return torch.full_like(scores, self.k >= self.n, dtype=torch.bool)
        m = mask_from_threshold(scores, self.thr, self.seen)
        if not self.thr.keep_all_equal:
            self.seen += int((scores == self.thr.value).sum())
        return m


def stream(keep: Keep, consensus: bool, passes: int, band: Band | None = None) -> Streamed:
    """The row-chunked form of a family: pass 0 l1 sums (and band radix), pass 1-2 band / trim radix."""

    def init(p: ParamSet, ctx: TensorCtx, n: int) -> dict:
        numel = math.prod(ctx.shape)
        st = {"l1": [[0.0, 0.0] for _ in range(n)], "factor": [None] * n, "band": {}, "trim": {}}
        st["stats"] = new_stats(n)
        for i in range(n):
            ks = band(i, p, tuple(ctx.shape)) if band else None
            if ks is not None:
                st["band"][i] = (Sel(ks[0], numel), Sel(ks[1], numel))
        td = getattr(p, "trim_density", 1.0)
        if td < 1.0:
            st["trim"] = {i: Sel(int(td * numel), numel) for i in range(n)}
        return st

    def tilde(st, i, tau, p, ctx):
        if i in st["band"]:
            hi, top = st["band"][i]
            a = tau.abs()
            return tau * (hi.mask(a) & ~top.mask(a))
        m, prob = keep(i, tau, p, ctx)
        return rescaled(tau, m, prob, _how(p), st["factor"][i])

    def gather(st, k, base, xs, p, ctx) -> None:
        for i, x in enumerate(xs):
            tau = x - base
            if k == 0 and _how(p) == "l1":
                m, _ = keep(i, tau, p, ctx)
                if m is not None:
                    a, b = l1_sums(tau, m)
                    st["l1"][i][0] += a
                    st["l1"][i][1] += b
            sels = [s for s in st["band"].get(i, ()) if s.radix] if k < 2 else []
            if k >= 1 and i in st["trim"] and st["trim"][i].radix:
                sels = [st["trim"][i]]
                tau = tilde(st, i, tau, p, ctx)
            for s in sels:
                s.radix.update(tau.abs())

    def end_pass(st, k) -> None:
        if k == 0:
            st["factor"] = [l1_factor(a, b) for a, b in st["l1"]]
        for pair in st["band"].values():
            for s in pair:
                if s.radix and k == 0:
                    s.radix.next_pass()
                elif s.radix and k == 1:
                    s.thr = s.radix.result()
        for s in st["trim"].values():
            if s.radix and k == 1:
                s.radix.next_pass()
            elif s.radix and k == 2:
                s.thr = s.radix.result()

    def apply(st, base, xs, weights, p: ParamSet, ctx) -> torch.Tensor:
        sparse = []
        for i, x in enumerate(xs):
            s = tilde(st, i, x - base, p, ctx)
            if i in st["trim"]:
                s = s * st["trim"][i].mask(s.abs())
            sparse.append(s)
        return combine(
            base,
            sparse,
            weights,
            consensus=consensus,
            normalize=p.normalize,
            lambda_=p.lambda_,
            stats=st["stats"],
        )

    return Streamed(
        init=init,
        apply=apply,
        passes=passes,
        gather=gather,
        end_pass=end_pass,
        finish=lambda st, ctx: record(st["stats"], ctx, consensus),
    )
