"""`merge-cli analyze`: task-vector statistics of a recipe's inputs, and what its method does to them.

One streamed pass over the plan's jobs, one tensor at a time (a tensor too large for the memory budget in
flat pieces, as the engine's statistics passes read them), no output model. Each job with a base adds its
task vectors to the accumulators of its layer, its module group, its (layer, group) cell and the whole
model (stats.Acc). The recipe's own kernel runs on each tensor (merge_cli.methods: nothing re-implemented)
for its kept fraction and elected-sign agreement; on a tensor read in pieces only elementwise kernels run
(others would see a piece, not the tensor) and the tensor is counted as `effect_skipped`.
Whole-model methods first get their statistics passes (engine.stats.run_stats_passes), as in a merge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from merge_cli import __version__
from merge_cli.analysis.findings import findings
from merge_cli.analysis.stats import TOP_SHARES, Acc
from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.errors import CheckpointError
from merge_cli.finite import count_nonfinite, describe_nonfinite
from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.plan import Input, MergePlan, TensorJob


def _read(plan: MergePlan, job: TensorJob):
    def read(ref):
        return plan.models[ref.model].checkpoint.read(ref.name)

    return (read(job.base) if job.base else None), [read(r) for r in job.inputs]


def expert_slots(plan: MergePlan) -> tuple[int | None, list[int]]:
    """(base model index, expert model indices): the inputs of the jobs that have a base, in order."""
    for job in plan.jobs:
        if job.base is not None:
            return job.base.model, [r.model for r in job.inputs]
    ref = getattr(plan.recipe, "base_model", None)  # a method that takes no base, with one named
    base = next((i for i, m in enumerate(plan.models) if ref and m.ref == str(ref)), None)
    if base is None or not plan.jobs:
        return None, []
    return base, [r.model for r in plan.jobs[0].inputs if r.model != base]


def working_bytes(plan: MergePlan, job: TensorJob) -> int:
    """Memory to analyze a tensor whole: inputs as read and in fp32, task vectors, kernel temporaries."""
    n_refs = len(job.inputs) + (1 if job.base else 0)
    item = ST_TO_TORCH[plan.compute_dtype].itemsize
    return sum(plan.models[r.model].checkpoint.info(r.name).nbytes for r in [job.base, *job.inputs]) + (
        job.numel * item * (2 * n_refs + 4)
    )


def _ctx(plan: MergePlan, job: TensorJob, offset: int, device: torch.device) -> TensorCtx:
    ctx = TensorCtx(name=job.name, layer=job.layer, group=job.group, seed=plan.recipe.seed, device=device,
                    num_layers=plan.num_layers, offset=offset, shape=tuple(job.shape))  # fmt: skip
    ctx.extra = plan.whole_model_stats.get(job.method, {})
    return ctx


def _params(job: TensorJob) -> ParamSet:
    return ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in job.params.items()})


def _pieces(plan: MergePlan, job: TensorJob, budget: int):
    """(offset, base, inputs, whole): the job's tensors whole (shaped) when they fit the budget, else in
    flat pieces (engine.stats.read_pieces)."""
    if working_bytes(plan, job) <= budget:
        base, inputs = _read(plan, job)
        yield 0, base, inputs, True
        return
    from merge_cli.engine.stats import piece_elements, read_pieces

    piece = piece_elements(plan, job, budget)
    for offset, base, inputs, _n in read_pieces(plan, job, piece, lambda p, j: _read(p, j)):
        whole = offset == 0 and base.numel() == job.numel
        if whole:
            base, inputs = base.reshape(job.shape), [x.reshape(job.shape) for x in inputs]
        yield offset, base, inputs, whole


def analyze(
    plan: MergePlan,
    budget: int,
    device: torch.device | None = None,
    progress: Callable[[TensorJob, int], None] | None = None,
    recipe_text: str = "",
    fast: bool = True,
) -> dict[str, Any]:
    """Stream the plan's inputs once and return the analysis (a JSON-able dict). fast: the engine's fast CPU
    kernels where they apply (bitwise the plain kernels' output; False: always the plain kernels)."""
    from merge_cli.engine.stats import run_stats_passes, whole_model_jobs

    device = device or torch.device("cpu")
    start = time.perf_counter()
    base_slot, slots = expert_slots(plan)
    labels = [plan.models[s].label for s in slots]
    n = len(labels)
    compute = ST_TO_TORCH[plan.compute_dtype]
    total, by_group, by_layer, cells = Acc(n), {}, {}, {}
    notes: list[str] = []
    bytes_read, effect_skipped, no_base, ran = 0, [], 0, 0
    weights: dict[str, list[float]] = {lab: [] for lab in labels}
    if whole_model_jobs(plan):
        plan.whole_model_stats, passes, _ = run_stats_passes(plan, device, _read, budget=budget)
        bytes_read += sum(p["bytes_read"] for p in passes)
        notes.append(f"whole-model statistics: {len(passes)} pass(es) over the inputs before the analysis")
    for job in plan.jobs:
        nbytes = sum(
            plan.models[r.model].checkpoint.info(r.name).nbytes for r in [job.base, *job.inputs] if r
        )
        kernel_base = job.base is not None
        job = _with_base(plan, job, base_slot)
        if job.base is None or [r.model for r in job.inputs] != slots:
            no_base += 1  # no task vector to measure (a passthrough, a base-less method, another source set)
            if progress:
                progress(job, nbytes)
            continue
        for lab, w in zip(labels, job.weights):
            weights[lab].append(float(w))
        spec = METHODS[job.method]
        acc = Acc(n)
        for offset, base, inputs, whole in _pieces(plan, job, budget):
            b = base.to(device).to(torch.float32)  # statistics in fp32; the kernel in the compute dtype
            xs = [x.to(device).to(torch.float32) for x in inputs]
            del base, inputs
            taus = acc.add_piece(b, xs)
            if not math.isfinite(acc.base_sq + sum(acc.sq)):
                _nonfinite(plan, job, b, xs)
            if whole or spec.elementwise:
                ctx = _ctx(plan, job, offset, device)
                kb, kxs = (
                    (b, xs) if compute == torch.float32 else (b.to(compute), [x.to(compute) for x in xs])
                )
                merged, stats = _merged(job, kb if kernel_base else None, kxs, ctx, fast and whole)
                del kb, kxs
                acc.add_effect(b, taus, merged, stats)
                del merged
            elif job.name not in effect_skipped:
                effect_skipped.append(job.name)
            del b, xs, taus
        bytes_read += nbytes
        ran += 1
        total.merge(acc)
        by_group.setdefault(job.group, Acc(n)).merge(acc)
        if job.layer is not None:
            by_layer.setdefault(job.layer, Acc(n)).merge(acc)
            cells.setdefault((job.layer, job.group), Acc(n)).merge(acc)
        if progress:
            progress(job, nbytes)
    if no_base:
        notes.append(
            f"{no_base} tensor(s) without a base or with other sources (passthrough, slices) are not measured"
        )
    if effect_skipped:
        notes.append(
            f"method effect not measured on {len(effect_skipped)} tensor(s) read in pieces (the kernel needs "
            f"the whole tensor): {', '.join(effect_skipped[:3])}{' ...' if len(effect_skipped) > 3 else ''}; "
            "a larger --max-memory reads them whole"
        )
    result: dict[str, Any] = {
        "tool": "merge-cli",
        "version": __version__,
        "kind": "analysis",
        "recipe": str(plan.recipe.path) if plan.recipe.path else None,
        "recipe_text": recipe_text,
        "method": plan.recipe.method,
        "base": plan.models[base_slot].label if base_slot is not None else None,
        "experts": labels,
        "models": [{"label": m.label, "ref": m.ref, "path": m.path} for m in plan.models],
        "weights": {lab: (sum(w) / len(w) if w else None) for lab, w in weights.items()},
        "densities": _densities(plan, slots),
        "top_shares": list(TOP_SHARES),
        "tensors": len(plan.jobs),
        "tensors_measured": ran,
        "effect_skipped": effect_skipped,
        "bytes_read": bytes_read,
        "seconds": round(time.perf_counter() - start, 3),
        "device": str(device),
        "notes": notes,
        "overall": total.to_json(labels),
        "by_group": {g: a.to_json(labels) for g, a in sorted(by_group.items())},
        "by_layer": [dict(layer=k, **a.to_json(labels)) for k, a in sorted(by_layer.items())],
        "by_layer_group": [
            dict(layer=k[0], group=k[1], **a.to_json(labels)) for k, a in sorted(cells.items())
        ],
    }
    if base_slot is None:
        notes.append("the recipe has no base model: task vectors (expert - base) cannot be measured")
    result["findings"] = findings(result)
    return result


def _merged(job: TensorJob, base, xs, ctx: TensorCtx, fast: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The method's output in fp32 and the statistics its kernel reports: the engine's fast CPU kernel when
    it applies (kernels/dispatch.py, bitwise equal to the plain kernel), else the method's plain kernel."""
    from merge_cli.engine.stats import whole_model_job
    from merge_cli.kernels.blocked import NonFinite
    from merge_cli.kernels.dispatch import FUSED_METHODS, whole
    from merge_cli.kernels.gta import predraw

    params = _params(job)
    if fast and ctx.device.type == "cpu" and xs[0].dtype == torch.float32 and job.method in FUSED_METHODS:
        if not whole_model_job(job):
            stats: dict[str, Any] = {}
            try:
                pre = predraw(job.method, params, base, xs, ctx) if base is not None else None
                out = whole(job.method, base, xs, list(job.weights), params, torch.float32, stats, ctx, pre)
            except NonFinite:
                out = None
            if out is not None:
                return out, stats
    out = METHODS[job.method].kernel(base, xs, list(job.weights), params, ctx)
    return out, ctx.stats


def _nonfinite(plan: MergePlan, job: TensorJob, base: torch.Tensor, xs: list[torch.Tensor]) -> None:
    """Name the model and tensor holding NaN/Inf (the statistics would be meaningless) and stop."""
    for ref, t in zip([job.base, *job.inputs], [base, *xs]):
        nan, inf = count_nonfinite(t)
        if nan or inf:
            raise CheckpointError(
                f"model '{plan.models[ref.model].label}', tensor '{ref.name}': "
                f"{describe_nonfinite(nan, inf, t.numel())}; analyze needs finite inputs (a corrupt download?)"
            )
    raise CheckpointError(
        f"tensor '{job.name}': its task vectors overflow float32; analyze cannot measure them"
    )


def _with_base(plan: MergePlan, job: TensorJob, base_slot: int | None) -> TensorJob:
    """A job of a method that takes no base (linear, slerp without one) still has task vectors when the
    recipe names a base model holding the same tensor: measure them against it."""
    if job.base is not None or base_slot is None or not job.inputs:
        return job
    name = job.inputs[0].name
    info = plan.models[base_slot].checkpoint.tensors.get(name)
    if info is None or tuple(info.shape) != tuple(job.shape):
        return job
    return replace(job, base=Input(base_slot, name))


def _densities(plan: MergePlan, slots: list[int]) -> dict[str, float] | None:
    """Mean density per expert over the jobs that have one (None when the method has no density)."""
    per: dict[int, list[float]] = {}
    for job in plan.jobs:
        d = job.params.get("density")
        if d is None or job.base is None:
            continue
        ds = d if isinstance(d, (list, tuple)) else [d] * len(job.inputs)
        for r, v in zip(job.inputs, ds):
            per.setdefault(r.model, []).append(float(v))
    if not per:
        return None
    return {plan.models[s].label: round(sum(v) / len(v), 4) for s, v in per.items() if s in slots}
