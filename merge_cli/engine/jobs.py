"""One TensorJob as the engine sees it: its input bytes and working set, whether it can be chunked, its
reads, and the TensorCtx / ParamSet its kernel receives."""

from __future__ import annotations

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.engine.stats import whole_model_chunkable, whole_model_job
from merge_cli.methods import MethodSpec, ParamSet, TensorCtx
from merge_cli.plan import MergePlan, TensorJob


def _refs(job: TensorJob):
    return ([job.base] if job.base else []) + job.inputs


def job_inputs_bytes(plan: MergePlan, job: TensorJob) -> int:
    return sum(plan.models[r.model].checkpoint.info(r.name).nbytes for r in _refs(job))


def working_bytes(plan: MergePlan, job: TensorJob) -> int:
    """Memory one job needs when merged whole: inputs as read, each in the compute dtype, temporaries."""
    item = ST_TO_TORCH[plan.compute_dtype].itemsize
    return job_inputs_bytes(plan, job) + job.numel * item * (len(_refs(job)) + 4) + job.nbytes


def can_chunk(spec: MethodSpec, job: TensorJob) -> bool:
    # whole-model jobs merge against statistics gathered beforehand (engine/stats.py): in chunks if they can
    if whole_model_job(job) and not whole_model_chunkable(job):
        return False
    return (spec.elementwise or spec.streamed is not None) and len(job.shape) >= 1 and job.shape[0] > 1


def read_job(
    plan: MergePlan, job: TensorJob, pin: bool = False
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A job's input tensors as read; with pin (CUDA), in page-locked memory so the host-to-device copy is
    asynchronous (the pinning copy happens here, on the reader thread, overlapped with compute)."""

    def read(ref):
        t = plan.models[ref.model].checkpoint.read(ref.name)
        return t.pin_memory() if pin else t

    base = read(job.base) if job.base else None
    return base, [read(i) for i in job.inputs]


def _ctx(plan: MergePlan, job: TensorJob, device: torch.device, offset: int = 0) -> TensorCtx:
    ctx = TensorCtx(
        name=job.name, layer=job.layer, group=job.group, seed=plan.recipe.seed, device=device,
        offset=offset, shape=tuple(job.shape),
    )  # fmt: skip
    ctx.num_layers = plan.num_layers
    ctx.extra = plan.whole_model_stats.get(job.method, {})  # set by run_merge's statistics passes
    return ctx


def _params(job: TensorJob) -> ParamSet:
    return ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in job.params.items()})


def _bitwise_copy(spec: MethodSpec, job: TensorJob) -> bool:
    return spec.name == "passthrough" and job.params.get("scale", 1.0) == 1.0
