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
from merge_cli.methods.consensus import disjoint_merge, elect, trim, trim_sorted
from merge_cli.methods.selection import StreamingTopK, mask_from_threshold


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

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU, by method name: the blocked
# runner, then the primitives it calls (native C, with the eager blocked form as the fallback).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "ties": (
        "merge_cli.kernels.ties.run_ties",
        "merge_cli.kernels.ties.select_thresholds",
        "merge_cli.kernels.native.merge",
        "merge_cli.kernels.blocked.consensus",
    ),
}
