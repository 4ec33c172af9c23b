"""Whole-model statistics, gathered in streamed passes before the merge (two-pass whole-model methods).

A method whose math needs statistics over the whole model (a magnitude threshold over every tensor of a
task vector, a per-task min-max, ...) sets `MethodSpec.stats` to a `WholeModelStats` subclass. Before the
main loop, `run_stats_passes` streams every job of such a method once per round: one tensor of each model
at a time (never whole models), in the plan's order, through `gather`. After a round, `end_round` says
whether another round is needed (e.g. the second half of an exact radix selection, or a statistic that
depends on the first). The kernels of the main pass read the result from `ctx.extra`.

The building blocks (WholeModelStats, the exact streamed RadixSelect) are in merge_cli/methods/wholemodel.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.methods import METHODS, TensorCtx
from merge_cli.methods.wholemodel import job_params
from merge_cli.plan import MergePlan, TensorJob


def whole_model_job(job: TensorJob) -> bool:
    """Does this job merge against whole-model statistics (so it is merged whole, never in row chunks)?"""
    stats = METHODS[job.method].stats
    return stats is not None and stats.applies(job_params(job))


def whole_model_jobs(plan: MergePlan) -> dict[str, list[TensorJob]]:
    """Per whole-model method, the plan's jobs its statistics cover (in plan order)."""
    out: dict[str, list[TensorJob]] = {}
    for job in plan.jobs:
        spec = METHODS[job.method]
        if spec.stats is not None and spec.stats.applies(job_params(job)):
            out.setdefault(job.method, []).append(job)
    return out


def run_stats_passes(
    plan: MergePlan,
    device: torch.device,
    read_job: Callable,
    side_dir: Path | None = None,
    on_pass: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run every whole-model method's statistics passes.
    Returns ({method: ctx.extra}, one record per pass, {method: statistics summary for the report})."""
    groups = whole_model_jobs(plan)
    if not groups:
        return {}, [], {}
    states = {m: METHODS[m].stats(jobs, len(jobs[0].inputs), side_dir) for m, jobs in groups.items()}
    for st in states.values():  # where side files name the models (emr.json)
        st.model_refs = [{"label": m.label, "ref": m.ref, "path": m.path} for m in plan.models]
    owner = {id(j): m for m, jobs in groups.items() for j in jobs}
    compute = ST_TO_TORCH[plan.compute_dtype]
    active = set(states)
    records: list[dict[str, Any]] = []
    while active:
        start, nbytes = time.perf_counter(), 0
        labels = {m: states[m].rounds[states[m].round] for m in sorted(active)}
        for job in plan.jobs:
            m = owner.get(id(job))
            if m not in active:
                continue
            base, inputs = read_job(plan, job)
            nbytes += sum(t.numel() * t.element_size() for t in ([base] if base is not None else []) + inputs)
            b = base.to(device).to(compute) if base is not None else None
            xs = [t.to(device).to(compute) for t in inputs]
            del base, inputs
            ctx = TensorCtx(name=job.name, layer=job.layer, group=job.group, seed=plan.recipe.seed,
                            num_layers=plan.num_layers, device=device)  # fmt: skip
            states[m].gather(b, xs, job_params(job), ctx)
        for m in sorted(active):
            if not states[m].end_round():
                active.discard(m)
        rec = {
            "pass": len(records) + 1,
            "what": "; ".join(f"{m}: {lab}" for m, lab in labels.items()),
            "seconds": round(time.perf_counter() - start, 3),
            "bytes_read": nbytes,
        }
        records.append(rec)
        if on_pass:
            on_pass(rec)
    return {m: st.extra() for m, st in states.items()}, records, {m: st.summary() for m, st in states.items()}
