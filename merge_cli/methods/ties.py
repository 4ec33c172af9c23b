"""TIES-Merging: trim, elect sign, disjoint merge (METHODS.md §3), per tensor.

Trim keeps exactly int(density * numel) entries of each task vector by magnitude (ties at the threshold
broken by lowest flat index). The sign is elected on the unweighted sum of trimmed task vectors (the
paper), unless `weighted_election` is set (mergekit elects on the weighted sum); a coordinate whose sum is
exactly 0 counts as positive. The disjoint merge is a weighted mean (`merge_func: mean`), sum or max over
the entries that agree with the elected sign. Huge tensors are merged in row chunks with an exact
streamed threshold (two radix passes), bitwise equal to the whole-tensor result.

The sums over models (election, disjoint sum, divisor) are formed by weighted_sum: products in the compute
dtype, accumulated in fp32 for bf16/fp16 and rounded once (mergekit's stacked torch.sum). `numerics:
mergekit` (opt-in, also for mergekit-format recipes) trims as mergekit 0.1.5 does: the first
max(1, int(density * n)) entries of torch's descending argsort of |tau| in fp32, so magnitudes tied at the
threshold fall as torch's sort orders them (row-chunked tensors: lowest index). That matches mergekit's
bits where bf16 task vectors tie at the threshold, at mergekit's price (a full sort per tensor and model);
the default keeps the exact selection (index order at ties, no sort), so a mergekit recipe differs from
mergekit only in which of the threshold-tied entries are kept (docs/mergekit-compat.md §5 counts them).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods import ties_model
from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    Streamed,
    TensorCtx,
    mergekit_numerics,
    numerics_param,
    per_model,
)
from merge_cli.methods.selection import StreamingTopK, mask_from_threshold, topk_mask
from merge_cli.methods.task_arithmetic import weighted_sum


class TiesParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's trimmed task vector")
    density: float = per_model(
        0.2, ge=0.0, le=1.0, description="fraction of each task vector kept by magnitude"
    )
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    merge_func: Literal["mean", "sum", "max"] = Field("mean", description="disjoint mean, sum or max")
    weighted_election: bool = Field(False, description="elect signs on weighted task vectors (mergekit)")
    granularity: Literal["tensor", "model"] = Field(
        "tensor",
        description="trim per tensor (exactly k) or over the whole model (reference; streamed passes)",
    )
    topk: Literal["exact", "threshold"] = Field(
        "exact",
        description="granularity model: exactly int(d*k) kept (ties by index) or all |tau| >= the reference kth",
    )
    numerics: Numerics = numerics_param(
        "trim ties at the threshold broken by lowest index",
        "trim by torch's argsort of |tau| (max(1, int(density*n)) kept, ties as torch's sort orders them),"
        " as mergekit 0.1.5, to match its output bits at tied magnitudes; costs a full sort per tensor and"
        " model (row-chunked tensors: lowest index)",
        mergekit_default=False,
    )


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries."""
    if density >= 1.0:
        return delta
    return delta.mul_(topk_mask(delta.abs(), int(density * delta.numel())))


def trim_sorted(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude trim (numerics: mergekit): keep the max(1, int(density * n)) first entries of a
    descending torch.argsort of the fp32 magnitudes, so ties at the threshold fall as torch's sort orders
    them (not by index); density <= 0 keeps nothing."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    if density <= 0.0 or n == 0:
        return torch.zeros_like(delta)
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[: max(1, int(density * n))]] = 1
    return delta * mask.reshape(delta.shape)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """+1/-1 per coordinate: the sign of the sum over models (dim 0); an exact 0 counts as +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(
    trimmed: list[torch.Tensor], weights: list[float], sign: torch.Tensor, how: str, stats=None
):
    """Merge the entries whose sign agrees with the elected `sign` (+1/-1 per coordinate).

    mean/sum: sum_i w_i t_i [agree] (divided by sum_i w_i [agree], 0 -> 1, for mean), each sum formed by
    weighted_sum: products in the compute dtype, accumulated in fp32 for bf16/fp16 and rounded once (as
    mergekit's torch.sum over the stacked products; adding model by model in bf16 rounded at every step).
    stats, when given, is a dict accumulating 'kept' counts per model and 'touched'/'conflict' counts (a
    coordinate is touched when some entry is nonzero, in conflict when some entry opposes the election)."""
    agrees = []
    num = torch.zeros_like(trimmed[0]) if how == "max" else None
    best_abs = torch.zeros_like(trimmed[0]) if how == "max" else None
    touched = conflict = None
    for i, (w, t) in enumerate(zip(weights, trimmed)):
        along = t * sign  # > 0 where t agrees with the election, < 0 where it opposes it
        agree = along > 0
        if how == "max":
            contrib = t * agree * w
            better = contrib.abs() > best_abs
            num = torch.where(better, contrib, num)
            best_abs = torch.maximum(best_abs, contrib.abs())
        else:
            agrees.append(agree)
        if stats is not None:
            stats["kept"][i] += int(torch.count_nonzero(t))
            opposes = along < 0
            touched = agree.clone() if touched is None else touched.logical_or_(agree)
            conflict = opposes if conflict is None else conflict.logical_or_(opposes)
    if stats is not None:
        # an opposing entry implies an agreeing one (the election follows the sum), so touched covers it
        stats["touched"] += int(touched.sum())
        stats["conflict"] += int(conflict.sum())
    if how == "max":
        return num
    like = trimmed[0]
    num = weighted_sum((t * a for t, a in zip(trimmed, agrees, strict=True)), weights, like)
    if how == "mean":
        den = weighted_sum((a.to(like.dtype) for a in agrees), weights, like)
        num.div_(
            den.clamp_(min=torch.finfo(den.dtype).tiny)
            if all(w > 0 for w in weights)
            else torch.where(den == 0, 1.0, den)
        )
    return num


def elect(trimmed: list[torch.Tensor], weights, weighted: bool) -> torch.Tensor:
    """+1/-1 per coordinate: the sign of sum_i w_i t_i (of sum_i t_i unless weighted), formed by weighted_sum
    (mergekit's rounding in bf16); an exact 0 counts as +1."""
    total = weighted_sum(trimmed, list(weights) if weighted else [1.0] * len(trimmed), trimmed[0])
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def _merge(base, trimmed, weights, p: ParamSet, stats) -> torch.Tensor:
    sign = elect(trimmed, weights, p.weighted_election)
    merged = disjoint_merge(trimmed, list(weights), sign, p.merge_func, stats)
    return merged.mul_(p.lambda_).add_(base)


def _new_stats(n: int) -> dict:
    return {"kept": [0] * n, "touched": 0, "conflict": 0, "numel": 0}


def _record(stats: dict, ctx: TensorCtx) -> None:
    n = max(stats["numel"], 1)
    ctx.stats["kept_fraction"] = [k / n for k in stats["kept"]]
    ctx.stats["sign_conflict_rate"] = stats["conflict"] / max(stats["touched"], 1)


def ties(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    if p.granularity == "model":  # whole-model trim from the statistics passes (ties_model.py)
        return ties_model.ties_whole_model(base, tensors, weights, p, ctx)
    stats = _new_stats(len(tensors))
    stats["numel"] = base.numel()
    cut = trim_sorted if mergekit_numerics(p) else trim
    out = _merge(base, [cut(t - base, d) for t, d in zip(tensors, p.density)], weights, p, stats)
    _record(stats, ctx)
    return out


# -- the same, over row chunks -----------------------------------------------------------------------
def _init(p: ParamSet, ctx: TensorCtx, n_models: int) -> dict:
    numel = 1
    for d in ctx.shape or ():
        numel *= d
    state = {"stats": _new_stats(n_models), "select": {}, "thresholds": {}, "seen": [0] * n_models}
    state["stats"]["numel"] = numel
    for i, d in enumerate(p.density):
        k = int(d * numel)
        if d < 1.0 and 0 < k < numel:
            state["select"][i] = StreamingTopK(k, numel)
    return state


def _gather(state, pass_index, base, xs, p, ctx) -> None:
    for i, sel in state["select"].items():
        sel.update((xs[i] - base).abs())


def _end_pass(state, pass_index) -> None:
    for i, sel in state["select"].items():
        if pass_index == 0:
            sel.next_pass()
        else:
            state["thresholds"][i] = sel.result()


def _apply(state, base, xs, weights, p: ParamSet, ctx) -> torch.Tensor:
    trimmed = []
    for i, (x, d) in enumerate(zip(xs, p.density)):
        tau = x - base
        if i in state["thresholds"]:
            t = state["thresholds"][i]
            a = tau.abs()
            tau.mul_(mask_from_threshold(a, t, state["seen"][i]))
            if not t.keep_all_equal:
                state["seen"][i] += int((a == t.value).sum())
        elif int(d * state["stats"]["numel"]) <= 0:
            tau = torch.zeros_like(tau)
        trimmed.append(tau)
    return _merge(base, trimmed, weights, p, state["stats"])


SPEC = MethodSpec(
    name="ties",
    title="TIES-Merging (trim, elect sign, disjoint merge)",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023, arXiv:2306.01708",
    params=TiesParams,
    kernel=ties,
    needs_base=True,
    summary="theta = theta0 + lambda * disjoint_merge(elect(trim(tau_i, density)))",
    # not numerics: mergekit (torch's sort order at ties): it costs mergekit's full sort; opt-in
    mergekit_defaults={"density": 1.0, "weighted_election": True},
    streamed=Streamed(
        init=_init,
        apply=_apply,
        passes=2,
        gather=_gather,
        end_pass=_end_pass,
        finish=lambda s, ctx: _record(s["stats"], ctx),
    ),
    stats=ties_model.TiesModelStats,
    plan_check=ties_model.plan_check,
)
