"""TIES-Merging at the reference granularity (`granularity: model`, METHODS.md §3): whole-model trim.

The reference trims each task vector against a threshold over the whole flattened model: keep
|tau_i| >= kth, where kth is the (d - int(d * k))-th smallest |tau_i| (it keeps every tie at the threshold,
so at least int(d*k) + 1 entries: `topk: threshold`). The default `topk: exact` keeps exactly int(d*k):
everything above the int(d*k)-th largest |tau_i|, then the entries equal to it by lowest index over the
keys in sorted order (METHODS §0); that needs one more pass, counting the ties in each tensor.
With 16-bit checkpoints the difference is large: task vectors are quantised, so thousands of entries
share the threshold value. Coordinates whose elected sign sum is exactly 0 take the majority sign
of the whole model, sign(sum over coordinates of the elected signs). So the statistics are one threshold
per task (exact radix selection, two passes), the ties per tensor (exact mode) and one majority sign (a
last pass over the trimmed vectors).
"""

from __future__ import annotations

import torch

from merge_cli.methods.base import ParamSet, Streamed, TensorCtx
from merge_cli.methods.wholemodel import CHUNK, RadixSelect, WholeModelStats, colsum, step_elements


def trim_rank(d: int, density: float, exact: bool) -> int | None:
    """1-based ascending rank of the trim threshold; None when nothing is trimmed (density >= 1).
    exact: the int(d*k)-th largest (0 kept: rank d + 1, an infinite threshold); else the reference's
    (d - int(d*k))-th smallest."""
    if density >= 1.0:
        return None
    return d - int(d * density) + (1 if exact else 0)


def _keep(tau_abs: torch.Tensor, th: float | None, quota: int | None, taken: list[int], i: int):
    """Mask of kept entries: |tau| > th, plus entries equal to th: all of them (threshold mode, quota None)
    or the first `quota` of this tensor in flat order (exact mode; `taken[i]` counts earlier chunks)."""
    if th is None:
        return None
    if quota is None:
        return tau_abs >= th
    eq = tau_abs == th
    order = torch.cumsum(eq.to(torch.int64), 0) + taken[i]
    taken[i] += int(eq.sum())
    return (tau_abs > th) | (eq & (order <= quota))


def _trimmed(base, tensors, thr, s, e, quotas=None, taken=None) -> torch.Tensor:
    b = base.reshape(-1)[s:e]
    rows = []
    for i, t in enumerate(tensors):
        tau = t.reshape(-1)[s:e] - b
        keep = _keep(tau.abs(), thr[i], quotas[i] if quotas else None, taken, i)
        rows.append(tau if keep is None else tau * keep)
    return torch.stack(rows)


def _elect_on(trimmed: torch.Tensor, weights, weighted: bool) -> torch.Tensor:
    if not weighted:
        return trimmed
    return trimmed * torch.as_tensor(weights, dtype=trimmed.dtype, device=trimmed.device).reshape(-1, 1)


_LABELS = {
    "hi": "trim threshold of |tau| (high bits)",
    "lo": "trim threshold of |tau| (low bits)",
    "ties": "ties at the threshold (exact k)",
    "sign": "majority sign",
}


class TiesModelStats(WholeModelStats):
    rounds = tuple(_LABELS.values())  # topk: threshold skips the third

    @staticmethod
    def applies(params: ParamSet) -> bool:
        return params.granularity == "model"

    @classmethod
    def rounds_for(cls, params: ParamSet) -> tuple[str, ...]:
        keys = ("hi", "lo", "ties", "sign") if params.topk == "exact" else ("hi", "lo", "sign")
        return tuple(_LABELS[k] for k in keys)

    def __init__(self, jobs, n_models, side_dir):
        super().__init__(jobs, n_models, side_dir)
        self.exact = self.params.topk == "exact"
        self.keys = ("hi", "lo", "ties", "sign") if self.exact else ("hi", "lo", "sign")
        self.rounds = self.rounds_for(self.params)
        self.d = sum(j.numel for j in jobs)
        self.k = [int(self.d * dens) for dens in self.params.density]
        ranks = [trim_rank(self.d, dens, self.exact) for dens in self.params.density]
        self.sel = [RadixSelect([r], nonneg=True) if r is not None and r <= self.d else None for r in ranks]
        self.thr: list[float | None] = [None if r is None else float("inf") for r in ranks]
        self.above = [0] * n_models
        self.equal: dict[str, list[int]] = {}
        self.quota: dict[str, list[int]] | None = None
        self.sign_sum = 0
        self._taken: list[int] | None = None  # per tensor, over its pieces: entries at the threshold so far
        self._eq: list[int] | None = None

    def gather(self, base, tensors, params, ctx) -> None:
        n, stage = base.numel(), self.keys[self.round]
        if self._taken is None:  # the first piece of a tensor
            self._taken, self._eq = [0] * len(tensors), [0] * len(tensors)
        # one task row at a time (steps of CHUNK) but in the sign stage, which stacks the N rows
        step = step_elements(len(tensors), base.element_size()) if stage == "sign" else CHUNK
        for s in range(0, n, step):
            e = min(s + step, n)
            b = base.reshape(-1)[s:e]
            if stage in ("hi", "lo"):
                for t, sel in zip(tensors, self.sel, strict=True):
                    if sel is not None:
                        sel.add((t.reshape(-1)[s:e] - b).abs_())
            elif stage == "ties":
                for i, t in enumerate(tensors):
                    if self.thr[i] is not None:
                        a = (t.reshape(-1)[s:e] - b).abs_()
                        self.above[i] += int((a > self.thr[i]).sum())
                        self._eq[i] += int((a == self.thr[i]).sum())
            else:
                quotas = self.quota.get(ctx.name) if self.quota is not None else None
                trimmed = _trimmed(base, tensors, self.thr, s, e, quotas, self._taken)
                elect = _elect_on(trimmed, params.weight, params.weighted_election)
                self.sign_sum += int(torch.sign(colsum(elect)).sum())

    def end_tensor(self, ctx) -> None:
        if self.keys[self.round] == "ties" and self._eq is not None:
            self.equal[ctx.name] = self._eq
        self._taken = self._eq = None

    def end_round(self) -> bool:
        stage = self.keys[self.round]
        if stage in ("hi", "lo"):
            for sel in self.sel:
                if sel is not None:
                    sel.advance()
        if stage == "lo":
            self.thr = [
                sel.values[0] if sel is not None else th for sel, th in zip(self.sel, self.thr, strict=True)
            ]
        if (
            stage == "ties"
        ):  # ties at the threshold are kept by lowest index over the sorted keys (METHODS §0)
            need = [k - a for k, a in zip(self.k, self.above, strict=True)]
            self.quota = {}
            for name in sorted(self.equal):
                eq = self.equal[name]
                self.quota[name] = [max(0, min(q, e)) for q, e in zip(need, eq, strict=True)]
                need = [q - e for q, e in zip(need, eq, strict=True)]
        return super().end_round()

    def extra(self):
        return {"thr": self.thr, "majority": 1.0 if self.sign_sum >= 0 else -1.0, "quota": self.quota}

    def summary(self):
        return {"elements_per_task": self.d, "thresholds": self.thr, "elected_sign_sum": self.sign_sum}


def _init(p: ParamSet, ctx: TensorCtx, n_models: int) -> dict:
    return {"taken": [0] * n_models, "kept": torch.zeros(n_models, dtype=torch.float64), "n": 0,
            "conflicts": 0, "touched": 0}  # fmt: skip


def _apply(state, base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    """theta0 + the merged trimmed task vectors over base's elements (a whole tensor or its next row chunk:
    pieces must come in order, as the ties at the threshold are kept by lowest index)."""
    from merge_cli.methods.consensus import disjoint_merge

    thr, majority = ctx.extra["thr"], ctx.extra["majority"]
    quotas = ctx.extra["quota"].get(ctx.name) if ctx.extra.get("quota") is not None else None
    out = base.clone().reshape(-1)
    n = out.numel()
    state["n"] += n
    step = step_elements(len(tensors), out.element_size())
    for s in range(0, n, step):
        e = min(s + step, n)
        trimmed = _trimmed(base, tensors, thr, s, e, quotas, state["taken"])
        gamma = torch.sign(colsum(_elect_on(trimmed, weights, p.weighted_election))[0])
        gamma = torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)
        out[s:e] += p.lambda_ * disjoint_merge(list(trimmed), list(weights), gamma, p.merge_func)
        nz = trimmed != 0
        state["kept"] += nz.sum(dim=1).cpu().double()
        state["touched"] += int(nz.any(dim=0).sum())
        state["conflicts"] += int(((trimmed > 0).any(dim=0) & (trimmed < 0).any(dim=0)).sum())
    return out.reshape(base.shape)


def _finish(state, ctx: TensorCtx) -> None:
    ctx.stats["kept_fraction"] = [float(k) / max(state["n"], 1) for k in state["kept"]]
    ctx.stats["sign_conflict_rate"] = state["conflicts"] / max(state["touched"], 1)


def ties_whole_model(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    state = _init(p, ctx, len(tensors))
    out = _apply(state, base, tensors, weights, p, ctx)
    _finish(state, ctx)
    return out


# tensors too big to merge whole: the same merge over row chunks, in order
MODEL_STREAM = Streamed(init=_init, apply=_apply, finish=_finish)
TiesModelStats.streamed = MODEL_STREAM


def plan_check(params: list[ParamSet], num_layers: int | None) -> str | None:
    whole = [p for p in params if p.granularity == "model"]
    keys = ("density", "weighted_election", "topk") + (
        ("weight",) if any(p.weighted_election for p in whole) else ()
    )
    for key in keys:
        if len({getattr(p, key) for p in whole}) > 1:
            return (
                f"granularity: model needs one '{key}' per model for the whole model, not per layer or module"
            )
    return None
