"""TIES-Merging at the reference granularity (`granularity: model`, METHODS.md §3): whole-model trim.

The reference trims each task vector against a threshold over the whole flattened model: keep
|tau_i| >= kth, where kth is the (d - int(d * k))-th smallest |tau_i| (it keeps every tie at the threshold,
so at least int(d*k) + 1 entries). Coordinates whose elected sign sum is exactly 0 take the majority sign
of the whole model, sign(sum over coordinates of the elected signs). So the statistics are one threshold
per task (exact radix selection, two passes) and one majority sign (a third pass over the trimmed vectors).
"""

from __future__ import annotations

import torch

from merge_cli.methods.base import ParamSet, TensorCtx
from merge_cli.methods.wholemodel import RadixSelect, WholeModelStats

CHUNK = 1 << 22


def trim_rank(d: int, density: float) -> int | None:
    """1-based ascending rank of the reference threshold; None when nothing is trimmed (density >= 1)."""
    k = d - int(d * density)
    return k if (density < 1.0 and k >= 1) else None


def _trimmed(base, tensors, thr, s, e) -> torch.Tensor:
    b = base.reshape(-1)[s:e]
    rows = []
    for t, th in zip(tensors, thr, strict=True):
        tau = t.reshape(-1)[s:e] - b
        rows.append(tau if th is None else tau * (tau.abs() >= th))
    return torch.stack(rows)


def _elect_on(trimmed: torch.Tensor, weights, weighted: bool) -> torch.Tensor:
    if not weighted:
        return trimmed
    return trimmed * torch.as_tensor(weights, dtype=trimmed.dtype, device=trimmed.device).reshape(-1, 1)


class TiesModelStats(WholeModelStats):
    rounds = ("trim threshold of |tau| (high bits)", "trim threshold of |tau| (low bits)", "majority sign")

    @staticmethod
    def applies(params: ParamSet) -> bool:
        return params.granularity == "model"

    def __init__(self, jobs, n_models, side_dir):
        super().__init__(jobs, n_models, side_dir)
        self.d = sum(j.numel for j in jobs)
        ranks = [trim_rank(self.d, dens) for dens in self.params.density]
        self.sel = [RadixSelect([r], nonneg=True) if r is not None else None for r in ranks]
        self.thr: list[float | None] = [None] * n_models
        self.sign_sum = 0

    def gather(self, base, tensors, params, ctx) -> None:
        n = base.numel()
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            if self.round < 2:
                b = base.reshape(-1)[s:e]
                for t, sel in zip(tensors, self.sel, strict=True):
                    if sel is not None:
                        sel.add((t.reshape(-1)[s:e] - b).abs_())
                continue
            trimmed = _trimmed(base, tensors, self.thr, s, e)
            elect = _elect_on(trimmed, params.weight, params.weighted_election)
            self.sign_sum += int(torch.sign(elect.sum(dim=0)).sum())

    def end_round(self) -> bool:
        if self.round < 2:
            for sel in self.sel:
                if sel is not None:
                    sel.advance()
        if self.round == 1:
            self.thr = [sel.values[0] if sel is not None else None for sel in self.sel]
        return super().end_round()

    def extra(self):
        return {"thr": self.thr, "majority": 1.0 if self.sign_sum >= 0 else -1.0}

    def summary(self):
        return {"elements_per_task": self.d, "thresholds": self.thr, "elected_sign_sum": self.sign_sum}


def ties_whole_model(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    from merge_cli.methods.ties import disjoint_merge

    thr, majority = ctx.extra["thr"], ctx.extra["majority"]
    out = base.clone().reshape(-1)
    w = torch.as_tensor(list(weights), dtype=base.dtype, device=base.device)
    n = out.numel()
    kept = torch.zeros(len(tensors), dtype=torch.float64)
    conflicts = touched = 0
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        trimmed = _trimmed(base, tensors, thr, s, e)
        gamma = torch.sign(_elect_on(trimmed, weights, p.weighted_election).sum(dim=0))
        gamma = torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)
        out[s:e] += p.lambda_ * disjoint_merge(trimmed, w, gamma, p.merge_func)
        nz = trimmed != 0
        kept += nz.sum(dim=1).cpu().double()
        touched += int(nz.any(dim=0).sum())
        conflicts += int(((trimmed > 0).any(dim=0) & (trimmed < 0).any(dim=0)).sum())
    ctx.stats["kept_fraction"] = [float(k) / max(n, 1) for k in kept]
    ctx.stats["sign_conflict_rate"] = conflicts / max(touched, 1)
    return out.reshape(base.shape)


def plan_check(params: list[ParamSet], num_layers: int | None) -> str | None:
    whole = [p for p in params if p.granularity == "model"]
    keys = ("density", "weighted_election") + (("weight",) if any(p.weighted_election for p in whole) else ())
    for key in keys:
        if len({getattr(p, key) for p in whole}) > 1:
            return (
                f"granularity: model needs one '{key}' per model for the whole model, not per layer or module"
            )
    return None
