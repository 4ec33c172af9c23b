"""The compute side of the engine: inputs to the device in the compute dtype, the fast kernels when they
apply (merge_cli/kernels), else the method's plain kernel; task-vector norms and NaN/Inf checks on the way.
The row-chunked path for tensors too big to merge whole is in chunked.py."""

from __future__ import annotations

import math
from typing import Any

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.engine.chunked import ChunkedPath
from merge_cli.engine.jobs import _bitwise_copy, _ctx, _params
from merge_cli.engine.stats import whole_model_job
from merge_cli.finite import check_finite_inputs, ensure_finite
from merge_cli.kernels.blocked import NonFinite
from merge_cli.kernels.choice import KernelLog, dtype_name, why_plain
from merge_cli.methods import METHODS
from merge_cli.plan import MergePlan, TensorJob, report_params


class _Compute(ChunkedPath):
    """Moves inputs to the device in the compute dtype and runs kernels; accumulates task-vector norms."""

    def __init__(
        self, plan: MergePlan, device: torch.device, fused: bool = False, off_reason: str | None = None
    ):
        self.plan, self.device = plan, device
        self.dtype = ST_TO_TORCH[plan.compute_dtype]
        self.cuda = device.type == "cuda"
        self.fused = fused  # the blocked path is on; per tensor, fast() says whether it serves it
        self.log = KernelLog(None if fused else (off_reason or "off"))
        self.restore_threads: int | None = None  # set when one compute thread was chosen for the fast path
        self.check_finite = False  # issue 6: run_merge sets it unless --allow-nonfinite

    def why_plain(self, job: TensorJob, params=None) -> str | None:
        """None when the fast kernels serve this job in the compute dtype, else why not."""
        if whole_model_job(job):
            return f"{job.method} with granularity: model has no fast path"
        return why_plain(job.method, _params(job) if params is None else params, self.dtype)

    def ran_plain(self, reason: str) -> None:
        """Record a tensor merged by the plain kernels; they want every compute thread back."""
        self.log.ran_plain(reason)
        if self.restore_threads:
            torch.set_num_threads(self.restore_threads)
            self.restore_threads = None

    def predraw(self, job: TensorJob, base, inputs):
        """What a whole-tensor blocked dare_* merge needs first (the L1 sums), made on the reader thread
        (kernels/gta.predraw)."""
        if not self.fused or base is None or self.why_plain(job) is not None:
            return None
        from merge_cli.kernels.gta import predraw

        ctx = _ctx(self.plan, job, self.device)
        return predraw(job.method, _params(job), base, inputs, ctx, self.dtype)

    def try_fused(self, job: TensorJob, base, inputs, stats, pre=None) -> torch.Tensor | None:
        from merge_cli.kernels.dispatch import whole
        from merge_cli.kernels.route import NoKernel

        if not self.fused:
            return None
        why = self.why_plain(job)
        if why is not None:
            self.ran_plain(why)
            return None
        b = base.to(self.device, non_blocking=True) if base is not None else None
        xs = [t.to(self.device, non_blocking=True) for t in inputs]
        try:
            out = whole(
                job.method, b, xs, list(job.weights), _params(job), ST_TO_TORCH[job.out_dtype], stats,
                _ctx(self.plan, job, self.device), pre, self.dtype,
            )  # fmt: skip
        except NonFinite:  # a NaN/Inf input reached a count
            if self.check_finite:
                check_finite_inputs(self.plan, job, base, inputs)  # names the model and tensor, and raises
            self.ran_plain("NaN/Inf inputs (--allow-nonfinite)")
            return None  # --allow-nonfinite: the plain kernels merge it
        except NoKernel:
            self.ran_plain(f"{dtype_name(self.dtype)} compute of inputs the native kernels do not read")
            return None
        if out is None:  # the kernel declined: its reason, or mergekit's sort among tied magnitudes
            why = f"{job.method} with numerics: mergekit at tied magnitudes (torch's sort order)"
            self.ran_plain(stats.pop("_plain_why", why))
            return None
        self.log.ran_fast()
        bad = stats.pop("_nonfinite", None)
        if out is not None and self.check_finite and bad and any(bad):
            check_finite_inputs(self.plan, job, base, inputs)  # names the model and tensor, and raises
        sq = stats.pop("_sqnorms", None)
        if out is not None and sq is not None:
            stats["task_vector_norms"] = [math.sqrt(v) for v in sq]
        return out

    def prep(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, non_blocking=True).to(self.dtype)

    def to_host(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | tuple:
        """The output in the output dtype on the CPU. On CUDA: an asynchronous copy into pinned memory and
        the event that marks its end (the writer thread waits on it), so the copy overlaps the next job."""
        out = out.to(dtype)
        if not self.cuda:
            return out
        host = torch.empty(out.shape, dtype=dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def whole(self, job: TensorJob, base, inputs, pre=None) -> tuple[torch.Tensor, dict[str, Any]]:
        spec = METHODS[job.method]
        out_dtype = ST_TO_TORCH[job.out_dtype]
        stats: dict[str, Any] = {"name": job.name, "method": job.method, "params": report_params(job)}
        if _bitwise_copy(spec, job):
            if self.check_finite:
                check_finite_inputs(self.plan, job, base, inputs)
            return inputs[0].to(out_dtype), stats
        out = self.try_fused(job, base, inputs, stats, pre)  # checks NaN/Inf inside the fused loop
        if out is not None:
            return self.to_host(out, out_dtype), stats
        if self.check_finite:
            check_finite_inputs(self.plan, job, base, inputs)
        b = self.prep(base) if base is not None else None
        xs = [self.prep(t) for t in inputs]
        ctx = _ctx(self.plan, job, self.device)
        out = spec.kernel(b, xs, list(job.weights), _params(job), ctx)
        if tuple(out.shape) != tuple(job.shape):
            raise RuntimeError(
                f"method {spec.name} returned shape {list(out.shape)} for {job.name} {list(job.shape)}"
            )
        if b is not None:
            stats["task_vector_norms"] = [
                float(torch.linalg.vector_norm(x - b, dtype=torch.float64)) for x in xs
            ]
        stats.update(ctx.stats)
        return self.to_host(out, out_dtype), stats

    def check_counts(self, job: TensorJob, bad, offset: int, b, xs) -> None:
        """NaN/Inf counts from a fused kernel over a chunk ([base] + inputs, or inputs for linear): on any
        hit, the exact check names the model, tensor and rows, and stops the merge."""
        if not (self.check_finite and bad and any(bad)):
            return
        refs = ([job.base] if job.base is not None else []) + list(job.inputs)
        tensors = ([b] if b is not None else []) + list(xs)
        if len(bad) == len(job.inputs):  # linear: no base among the counts
            refs, tensors = list(job.inputs), list(xs)
        per_row = job.numel // job.shape[0]
        r0 = offset // per_row
        for ref, t, n in zip(refs, tensors, bad):
            if n:
                ensure_finite(self.plan, ref, t.cpu(), rows=(r0, r0 + t.shape[0]))
