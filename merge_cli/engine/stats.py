"""Whole-model statistics, gathered in streamed passes before the merge (two-pass whole-model methods).

A method whose math needs statistics over the whole model (a magnitude threshold over every tensor of a
task vector, a per-task min-max, ...) sets `MethodSpec.stats` to a `WholeModelStats` subclass. Before the
main loop, `run_stats_passes` streams every job of such a method once per round, in the plan's order,
through `gather`: as consecutive flat pieces of each tensor, read as the rows that cover them, so that a
piece of every model fits in a quarter of the memory budget (never whole models, nor whole big tensors
such as the embedding). After a round, `end_round` says whether another round is needed (e.g. the second
half of an exact radix selection, or a statistic that depends on the first). The kernels of the main pass
read the result from `ctx.extra`; big tensors are merged in row chunks there too (`WholeModelStats.streamed`,
or the kernel itself for elementwise methods).

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
from merge_cli.methods.base import Streamed
from merge_cli.methods.wholemodel import CHUNK, job_params
from merge_cli.plan import MergePlan, TensorJob

MIN_PIECE = 64  # elements: pieces are powers of two in [MIN_PIECE, CHUNK] (multiples of 8: EMR packs bits)


def whole_model_job(job: TensorJob) -> bool:
    """Does this job merge against whole-model statistics (gathered by the passes here)?"""
    stats = METHODS[job.method].stats
    return stats is not None and stats.applies(job_params(job))


def whole_model_chunkable(job: TensorJob) -> bool:
    """Can this whole-model job be merged in row chunks (an elementwise kernel, or a row-chunked form)?"""
    return METHODS[job.method].elementwise or METHODS[job.method].stats.streamed is not None


def whole_model_streamed(job: TensorJob) -> Streamed | None:
    """The row-chunked form of a whole-model job's merge (None: its kernel is elementwise)."""
    return METHODS[job.method].stats.streamed


def _refs(job: TensorJob) -> list:
    return ([job.base] if job.base else []) + list(job.inputs)


def piece_elements(plan: MergePlan, job: TensorJob, budget: int | None) -> int:
    """Elements per piece: the largest power of two up to CHUNK whose working set (a piece of every model as
    read and in the compute dtype, four temporaries) fits in a quarter of the budget; CHUNK without one."""
    if budget is None:
        return CHUNK
    n = max(job.numel, 1)
    raw = sum(plan.models[r.model].checkpoint.info(r.name).nbytes for r in _refs(job)) / n
    per_element = raw + ST_TO_TORCH[plan.compute_dtype].itemsize * (len(_refs(job)) + 4)
    piece = CHUNK
    while piece > MIN_PIECE and piece * per_element > budget // 4:
        piece //= 2
    return piece


def read_pieces(plan: MergePlan, job: TensorJob, piece: int, read_job: Callable):
    """(flat offset, base piece, input pieces, bytes read): the job's tensors as raw flat 1-D pieces
    [offset, offset + piece), in order. A tensor that fits in one piece is read whole (read_job); a bigger
    one as the rows covering each piece (a row straddling two pieces is read twice)."""
    n = job.numel
    if n <= piece or len(job.shape) == 0 or job.shape[0] <= 1:
        base, inputs = read_job(plan, job)
        ts = ([base] if base is not None else []) + inputs
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        flat = [t.reshape(-1) for t in ts]
        yield 0, (flat[0] if base is not None else None), flat[1 if base is not None else 0 :], nbytes
        return
    per_row = n // job.shape[0]
    for s in range(0, n, piece):
        e = min(s + piece, n)
        r0, r1 = s // per_row, -(-e // per_row)
        parts, nbytes = [], 0
        for ref in _refs(job):
            rows = plan.models[ref.model].checkpoint.read_rows(ref.name, r0, r1)
            nbytes += rows.numel() * rows.element_size()
            parts.append(rows.reshape(-1)[s - r0 * per_row : e - r0 * per_row])
        base = parts[0] if job.base else None
        yield s, base, parts[1:] if job.base else parts, nbytes


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
    budget: int | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Run every whole-model method's statistics passes, reading pieces sized by the memory budget (bytes;
    None: pieces of CHUNK elements).
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
        start, nbytes, pieces = time.perf_counter(), 0, 0
        labels = {m: states[m].rounds[states[m].round] for m in sorted(active)}
        for job in plan.jobs:
            m = owner.get(id(job))
            if m not in active:
                continue
            params = job_params(job)
            ctx = TensorCtx(name=job.name, layer=job.layer, group=job.group, seed=plan.recipe.seed,
                            num_layers=plan.num_layers, device=device, shape=tuple(job.shape))  # fmt: skip
            for offset, base, inputs, nread in read_pieces(
                plan, job, piece_elements(plan, job, budget), read_job
            ):
                nbytes += nread
                pieces += 1
                b = base.to(device).to(compute) if base is not None else None
                xs = [t.to(device).to(compute) for t in inputs]
                del base, inputs
                ctx.offset = offset
                states[m].gather(b, xs, params, ctx)
                del b, xs
            states[m].end_tensor(ctx)
        for m in sorted(active):
            if not states[m].end_round():
                active.discard(m)
        rec = {
            "pass": len(records) + 1,
            "what": "; ".join(f"{m}: {lab}" for m, lab in labels.items()),
            "seconds": round(time.perf_counter() - start, 3),
            "bytes_read": nbytes,
            "pieces": pieces,  # reads of a piece of every model (a small tensor is one piece)
        }
        records.append(rec)
        if on_pass:
            on_pass(rec)
    return {m: st.extra() for m, st in states.items()}, records, {m: st.summary() for m, st in states.items()}
