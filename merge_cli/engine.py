"""The streaming engine: read -> kernel -> cast -> write, one tensor at a time, overlapped.

A reader thread prefetches the next jobs' input tensors (bounded queue), the calling thread runs the
kernels on the compute device, and a writer thread streams finished tensors into their shards. Memory
stays near (inputs + 2) x the largest tensor plus the queued jobs, never the model size.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.errors import MergeCliError
from merge_cli.io.writer import ShardedWriter
from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.plan import MergePlan, TensorJob, report_params
from merge_cli.stats_pass import run_stats_passes

_DONE = object()


@dataclass
class EngineOptions:
    device: str = "auto"
    threads: int | None = None
    prefetch: int = 2  # jobs read ahead
    progress: Callable[[TensorJob, int], None] | None = None  # called after each job with its input bytes
    on_pass: Callable[[dict[str, Any]], None] | None = None  # called after each whole-model statistics pass


@dataclass
class EngineResult:
    tensors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    device: str = "cpu"
    stats_passes: list[dict[str, Any]] = field(default_factory=list)  # whole-model statistics passes (stats_pass.py)
    whole_model: dict[str, Any] = field(default_factory=dict)  # their statistics, per method


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeCliError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeCliError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise MergeCliError(f"--device {spec}: use auto, cpu, cuda or cuda:N")


def job_inputs_bytes(plan: MergePlan, job: TensorJob) -> int:
    refs = ([job.base] if job.base else []) + job.inputs
    return sum(plan.models[r.model].checkpoint.info(r.name).nbytes for r in refs)


def read_job(plan: MergePlan, job: TensorJob) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    def read(ref):
        return plan.models[ref.model].checkpoint.read(ref.name)

    base = read(job.base) if job.base else None
    return base, [read(i) for i in job.inputs]


def compute_job(
    plan: MergePlan,
    job: TensorJob,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor],
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run one job's kernel; returns the output tensor (CPU, output dtype) and its statistics."""
    spec = METHODS[job.method]
    out_dtype = ST_TO_TORCH[job.out_dtype]
    stats: dict[str, Any] = {"name": job.name, "method": job.method, "params": report_params(job)}
    if spec.name == "passthrough" and job.params.get("scale", 1.0) == 1.0:
        return inputs[0].to(out_dtype), stats  # a bitwise copy when the dtype does not change
    compute = ST_TO_TORCH[plan.compute_dtype]

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, non_blocking=True).to(compute)

    b = prep(base) if base is not None else None
    xs = [prep(t) for t in inputs]
    ctx = TensorCtx(name=job.name, layer=job.layer, group=job.group, seed=plan.recipe.seed, device=device)
    ctx.num_layers = plan.num_layers
    ctx.extra = extra if extra is not None else {}
    params = ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in job.params.items()})
    out = spec.kernel(b, xs, list(job.weights), params, ctx)
    if tuple(out.shape) != tuple(job.shape):
        raise RuntimeError(f"method {spec.name} returned shape {list(out.shape)} for {job.name} {list(job.shape)}")
    if b is not None:
        stats["task_vector_norms"] = [float(torch.linalg.vector_norm((x - b).float())) for x in xs]
    stats.update(ctx.stats)
    return out.to(out_dtype).to("cpu"), stats


class _Worker(threading.Thread):
    def __init__(self, target, name):
        super().__init__(target=self._run, name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def _run(self):
        try:
            self._target_fn()
        except BaseException as e:  # surfaced in the main thread
            self.error = e


def run_merge(plan: MergePlan, writer: ShardedWriter, options: EngineOptions | None = None) -> EngineResult:
    opts = options or EngineOptions()
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = EngineResult(device=str(device))
    start = time.perf_counter()
    # whole-model methods: their statistics passes stream the models first (merge_cli/stats_pass.py)
    extras, result.stats_passes, result.whole_model = run_stats_passes(
        plan, device, read_job, side_dir=writer.tmp, on_pass=opts.on_pass
    )
    result.bytes_read += sum(p["bytes_read"] for p in result.stats_passes)
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
    write_q: queue.Queue = queue.Queue(maxsize=2)

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        for job in plan.jobs:
            if stop.is_set() or not put(read_q, (job, *read_job(plan, job))):
                return
        put(read_q, _DONE)

    def write_loop():
        while True:
            try:
                item = write_q.get(timeout=0.1)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if item is _DONE:
                return
            name, tensor = item
            writer.write(name, tensor)
            result.bytes_written += tensor.numel() * tensor.element_size()

    readers = _Worker(reader, "merge-cli-reader")
    writers = _Worker(write_loop, "merge-cli-writer")
    readers.start()
    writers.start()
    try:
        while True:
            try:
                item = read_q.get(timeout=0.1)
            except queue.Empty:
                for worker in (readers, writers):
                    if worker.error:
                        raise worker.error from None
                continue
            if item is _DONE:
                break
            job, base, inputs = item
            out, stats = compute_job(plan, job, base, inputs, device, extras.get(job.method))
            nbytes = job_inputs_bytes(plan, job)
            result.bytes_read += nbytes
            result.tensors.append(stats)
            if not put(write_q, (job.name, out)):
                break
            if writers.error:
                raise writers.error
            if opts.progress:
                opts.progress(job, nbytes)
        put(write_q, _DONE)
        writers.join()
        if writers.error:
            raise writers.error
    finally:
        stop.set()
        readers.join(timeout=5)
        writers.join(timeout=5)
    result.seconds = time.perf_counter() - start
    return result
