"""The streaming engine: read -> kernel -> cast -> write, one tensor at a time, overlapped.

A reader thread prefetches the next jobs' input tensors (bounded by bytes), the calling thread runs the
kernels on the compute device, and a writer thread streams finished tensors into their shards. Tensors
whose working set would exceed half the memory budget (embeddings, lm_head) are merged in row chunks:
elementwise methods chunk as they are, others through their Streamed form (statistics passes, then
apply). Peak memory follows the budget, not the model or vocabulary size.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.errors import MergeCliError
from merge_cli.finite import check_finite_inputs, ensure_finite
from merge_cli.fused import NonFinite
from merge_cli.io.writer import ShardedWriter
from merge_cli.methods import METHODS, MethodSpec, ParamSet, TensorCtx
from merge_cli.methods.selection import SAMPLE
from merge_cli.plan import MergePlan, TensorJob, report_params
from merge_cli.stats_pass import (
    run_stats_passes,
    whole_model_chunkable,
    whole_model_job,
    whole_model_streamed,
)

_DONE = object()


@dataclass
class EngineOptions:
    device: str = "auto"
    threads: int | None = None
    max_memory: int | None = None  # bytes; default: default_max_memory()
    fused: str = "auto"  # auto | on | off: blocked CPU kernels (fused.py) for linear, task_arithmetic, ties
    progress: Callable[[TensorJob, int], None] | None = None  # called after each job with its input bytes
    on_pass: Callable[[dict[str, Any]], None] | None = None  # called after each whole-model statistics pass
    # -- reliability (issue 6) --
    allow_nonfinite: bool = False  # else a NaN/Inf in any job input stops the merge, naming model and tensor
    skip_shards: frozenset[int] = frozenset()  # shards completed by an interrupted run (--resume): not read
    on_stats: Callable[[TensorJob, dict[str, Any]], None] | None = None  # each job's stats, before its write


# Test hook (issue 6): seconds to sleep after each tensor, so kill-and-resume tests can stop a merge midway.
TEST_DELAY_ENV = "MERGE_CLI_TEST_DELAY_PER_TENSOR"


@dataclass
class EngineResult:
    tensors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    device: str = "cpu"
    kernels: str = "plain"  # plain torch, or on the CPU: native (merge_cli/native) / eager blocked (fused.py)
    max_memory: int = 0
    chunked: list[str] = field(default_factory=list)
    stats_passes: list[dict[str, Any]] = field(
        default_factory=list
    )  # whole-model statistics passes (stats_pass.py)
    whole_model: dict[str, Any] = field(default_factory=dict)  # their statistics, per method


def default_max_memory() -> int:
    """1/8 of the memory available now, within [1 GB, 16 GB]."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = 8 << 30
    return int(min(max(avail // 8, 1 << 30), 16 << 30))


def _return_freed_memory() -> None:
    """glibc keeps large freed buffers in its heap unless they were mmapped: pin the mmap threshold so
    tensor-sized buffers go back to the OS when freed (RSS follows the live working set)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD = 32 MiB, glibc's ceiling (fixed, not dynamic)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def resolve_device(spec: str) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeCliError(
                f"--device {spec}: no CUDA device is available here; use --device cpu or auto"
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeCliError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise MergeCliError(f"--device {spec}: use auto, cpu, cuda or cuda:N")


def _refs(job: TensorJob):
    return ([job.base] if job.base else []) + job.inputs


def job_inputs_bytes(plan: MergePlan, job: TensorJob) -> int:
    return sum(plan.models[r.model].checkpoint.info(r.name).nbytes for r in _refs(job))


def working_bytes(plan: MergePlan, job: TensorJob) -> int:
    """Memory one job needs when merged whole: inputs as read, each in the compute dtype, temporaries."""
    item = ST_TO_TORCH[plan.compute_dtype].itemsize
    return job_inputs_bytes(plan, job) + job.numel * item * (len(_refs(job)) + 4) + job.nbytes


def can_chunk(spec: MethodSpec, job: TensorJob) -> bool:
    # whole-model jobs merge against statistics gathered beforehand (stats_pass.py): in chunks if they can
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


class _Compute:
    """Moves inputs to the device in the compute dtype and runs kernels; accumulates task-vector norms."""

    def __init__(self, plan: MergePlan, device: torch.device, fused: bool = False):
        self.plan, self.device = plan, device
        self.dtype = ST_TO_TORCH[plan.compute_dtype]
        self.cuda = device.type == "cuda"
        self.fused = fused and self.dtype == torch.float32
        self.check_finite = False  # issue 6: run_merge sets it unless --allow-nonfinite

    def predraw(self, job: TensorJob, base, inputs):
        """What a whole-tensor blocked dare_* merge needs first (the L1 sums), made on the reader thread
        (fused_methods.predraw)."""
        if not self.fused or whole_model_job(job) or base is None:
            return None
        from merge_cli.fused_methods import predraw

        return predraw(job.method, _params(job), base, inputs, _ctx(self.plan, job, self.device))

    def try_fused(self, job: TensorJob, base, inputs, stats, pre=None) -> torch.Tensor | None:
        from merge_cli.fused_methods import FUSED_METHODS, whole

        if not (self.fused and job.method in FUSED_METHODS) or whole_model_job(job):
            return None
        b = base.to(self.device, non_blocking=True) if base is not None else None
        xs = [t.to(self.device, non_blocking=True) for t in inputs]
        try:
            out = whole(
                job.method, b, xs, list(job.weights), _params(job), ST_TO_TORCH[job.out_dtype], stats,
                _ctx(self.plan, job, self.device), pre,
            )  # fmt: skip
        except NonFinite:  # a NaN/Inf input reached a count
            if self.check_finite:
                check_finite_inputs(self.plan, job, base, inputs)  # names the model and tensor, and raises
            return None  # --allow-nonfinite: the plain kernels merge it
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

    def fused_chunk_apply(self, job: TensorJob, rows: int, state, params: ParamSet, weights, out_dtype):
        """A per-chunk blocked apply (offset, base, xs) -> (out, squared task-vector norms or None), or None
        when the blocked kernels do not apply. For ties, dare_* and breadcrumbs*, what needs the whole
        tensor (exact thresholds and tie cutoffs, L1 factors) is found first, in passes over the chunks."""
        from merge_cli.fused_methods import (
            applies,
            counts_for,
            gta_sparsify,
            run_gta,
            run_ties,
            select_thresholds,
            trims,
            whole,
        )  # fmt: skip

        if not (self.fused and applies(job.method, params)) or whole_model_job(job):
            return None
        if job.method in ("linear", "task_arithmetic"):

            def elementwise(offset, b, xs):
                st: dict[str, Any] = {}
                out = whole(job.method, b, xs, weights, params, out_dtype, st)
                self.check_counts(job, st.get("_nonfinite"), offset, b, xs)
                return out, st.get("_sqnorms")

            return elementwise
        models = self.plan.models
        per_row = job.numel // job.shape[0]

        def read(ref, r0: int, r1: int) -> torch.Tensor:
            return models[ref.model].checkpoint.read_rows(ref.name, r0, r1).reshape(-1)

        @functools.cache  # breadcrumbs brackets two thresholds per model from one sample
        def samples(i: int) -> torch.Tensor:  # whole rows at a fixed stride, about SAMPLE entries
            picked = range(0, job.shape[0], max(1, job.shape[0] // max(1, SAMPLE // per_row)))
            b = torch.cat([read(job.base, r, r + 1) for r in picked]).to(torch.float32)
            x = torch.cat([read(job.inputs[i], r, r + 1) for r in picked]).to(torch.float32)
            return (x - b).abs()

        def region(i: int, g0: int, g1: int):
            r0, r1 = g0 // per_row, -(-g1 // per_row)
            lo, hi = g0 - r0 * per_row, g1 - r0 * per_row
            return read(job.base, r0, r1)[lo:hi], read(job.inputs[i], r0, r1)[lo:hi]

        views = (samples, lambda: self.chunks(job, rows, raw=True, check=False), region)
        ctx = _ctx(self.plan, job, self.device)
        try:
            if job.method == "ties":
                steps = trims(*select_thresholds(job.numel, counts_for(job.numel, params.density), *views))
            else:
                steps = gta_sparsify(job.method, params, job.numel, len(job.inputs), ctx, views)
        except NonFinite:  # a NaN/Inf input reached a count
            if self.check_finite:
                for _ in self.chunks(job, rows, raw=True):  # names the model, tensor and rows, and raises
                    pass
            return None  # --allow-nonfinite: the plain streamed kernels merge it

        def apply(offset, b, xs):
            try:
                if job.method == "ties":
                    res = run_ties(b, xs, weights, params, out_dtype, steps, offset)
                else:
                    res = run_gta(job.method, b, xs, weights, params, out_dtype, steps, offset)
            except NonFinite:  # Infs that cancel in the election: name the rows, or stop clearly
                self.check_counts(job, [1] * (len(xs) + 1), offset, b, xs)
                raise MergeCliError(
                    f"tensor '{job.name}': NaN/Inf values met in the merge; run again with --fused off"
                ) from None
            out, kept, touched, conflict, bad, sq = res
            self.check_counts(job, bad, offset, b, xs)
            st = state["stats"]
            st["numel"] = job.numel
            for i, k in enumerate(kept):
                st["kept"][i] += k
            if touched is not None:
                st["touched"] += touched
                st["conflict"] += conflict
            return out, sq

        return apply

    def chunks(
        self, job: TensorJob, rows: int, raw: bool = False, check: bool = True
    ) -> Iterator[tuple[int, torch.Tensor | None, list[torch.Tensor]]]:
        """(flat offset, base chunk, input chunks) on the device (in the compute dtype unless raw), in row order."""
        models = self.plan.models
        per_row = job.numel // job.shape[0]
        for r0 in range(0, job.shape[0], rows):
            r1 = min(r0 + rows, job.shape[0])

            def read(ref, r0=r0, r1=r1):
                t = models[ref.model].checkpoint.read_rows(ref.name, r0, r1)
                if check and self.check_finite:  # issue 6: NaN/Inf in a source stops the merge (first pass)
                    ensure_finite(self.plan, ref, t, rows=(r0, r1))
                return t.to(self.device, non_blocking=True) if raw else self.prep(t)

            yield r0 * per_row, (read(job.base) if job.base else None), [read(i) for i in job.inputs]

    def chunked(self, job: TensorJob, rows: int, emit: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        """Merge a huge tensor in row chunks, handing each output chunk to emit()."""
        spec = METHODS[job.method]
        out_dtype = ST_TO_TORCH[job.out_dtype]
        params, weights = _params(job), list(job.weights)
        ctx = _ctx(self.plan, job, self.device)
        stats: dict[str, Any] = {
            "name": job.name,
            "method": job.method,
            "params": report_params(job),
            "chunked": True,
        }
        st = whole_model_streamed(job) if whole_model_job(job) else spec.streamed
        state = st.init(params, ctx, len(job.inputs)) if st else None
        fused_apply = self.fused_chunk_apply(job, rows, state, params, weights, out_dtype)
        passes = st.passes if st and fused_apply is None else 0
        for p in range(passes):
            for offset, b, xs in self.chunks(job, rows, check=p == 0):
                ctx.offset = offset
                st.gather(state, p, b, xs, params, ctx)
            st.end_pass(state, p)
        sq = [0.0] * len(job.inputs)
        first = not passes  # the first pass over the rows checks them for NaN/Inf
        # the fused kernels count NaN/Inf in the same loop, so their rows need no separate check
        for offset, b, xs in self.chunks(
            job, rows, raw=fused_apply is not None, check=first and fused_apply is None
        ):
            ctx.offset = offset
            if fused_apply is not None:
                out, chunk_sq = fused_apply(offset, b, xs)  # task-vector norms come from the same loop
                for i, v in enumerate(chunk_sq or ()):
                    sq[i] += v
            else:
                out = (
                    st.apply(state, b, xs, weights, params, ctx)
                    if st
                    else spec.kernel(b, xs, weights, params, ctx)
                )
                if b is not None:
                    for i, x in enumerate(xs):
                        sq[i] += float(torch.linalg.vector_norm(x - b, dtype=torch.float64)) ** 2
            emit(self.to_host(out, out_dtype))
        if job.base is not None:
            stats["task_vector_norms"] = [math.sqrt(s) for s in sq]
        if st and st.finish:
            st.finish(state, ctx)
        stats.update(ctx.stats)
        return stats


def use_fused(mode: str, plan: MergePlan, device: torch.device) -> bool:
    """The blocked CPU kernels (fused.py) serve linear, task_arithmetic and TIES on the CPU unless --fused off."""
    if mode not in ("auto", "on", "off"):
        raise MergeCliError(f"--fused {mode}: use auto, on or off")
    return mode != "off" and device.type == "cpu"


def all_blocked(plan: MergePlan) -> bool:
    """Does every job run on the blocked CPU kernels (fused.py) or as a plain copy?"""
    from merge_cli.fused_methods import applies

    return all(
        (applies(j.method, _params(j)) and not whole_model_job(j)) or _bitwise_copy(METHODS[j.method], j)
        for j in plan.jobs
    )


class _Gate:
    """Bounds the bytes read ahead but not yet merged (one job always passes)."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while self.used and self.used + n > self.cap:
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class _Worker(threading.Thread):
    def __init__(self, target, name):
        super().__init__(target=self._run, name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def _run(self):
        try:
            self._fn()
        except BaseException as e:  # surfaced in the main thread
            self.error = e


def run_merge(plan: MergePlan, writer: ShardedWriter, options: EngineOptions | None = None) -> EngineResult:
    threads = torch.get_num_threads()
    try:
        return _run_merge(plan, writer, options or EngineOptions())
    finally:
        torch.set_num_threads(threads)  # the thread count is process-wide: leave it as found


def _run_merge(plan: MergePlan, writer: ShardedWriter, opts: EngineOptions) -> EngineResult:
    device = resolve_device(opts.device)
    _return_freed_memory()
    budget = opts.max_memory or default_max_memory()
    result = EngineResult(device=str(device), max_memory=budget)
    compute = _Compute(plan, device, use_fused(opts.fused, plan, device))
    if compute.fused:
        from merge_cli import native

        why = native.unavailable_reason() if native.lib() is None else None
        result.kernels = "native" if why is None else f"eager blocked ({why})"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    elif compute.fused and all_blocked(plan):
        # The blocked kernels run one op per ~1 MB block: splitting each op over threads costs more in
        # wake-ups than it gains, and the other cores serve the reader, writer and hasher threads.
        torch.set_num_threads(1)
    compute.check_finite = not opts.allow_nonfinite
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    big = {
        id(j) for j in plan.jobs if can_chunk(METHODS[j.method], j) and working_bytes(plan, j) > budget // 2
    }
    start = time.perf_counter()
    # whole-model methods: their statistics passes stream the models first (merge_cli/stats_pass.py)
    plan.whole_model_stats, result.stats_passes, result.whole_model = run_stats_passes(
        plan, device, read_job, side_dir=writer.tmp, on_pass=opts.on_pass, budget=budget
    )
    result.bytes_read += sum(p["bytes_read"] for p in result.stats_passes)
    stop = threading.Event()
    gate = _Gate(max(budget // 4, 1))
    read_q: queue.Queue = queue.Queue()
    write_q: queue.Queue = queue.Queue(maxsize=4)

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            if writers.error is not None:  # the writer died (disk full...): nothing will drain its queue
                return False
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        for job in plan.jobs:
            if job.shard in opts.skip_shards:
                continue
            if id(job) in big:
                item = (job, 0, None, None, None)  # the main thread streams it in chunks
            else:
                n = job_inputs_bytes(plan, job)
                if not gate.acquire(n, stop):
                    return
                base, inputs = read_job(plan, job, pin=compute.cuda)
                item = (job, n, base, inputs, compute.predraw(job, base, inputs))
                del base, inputs
            if stop.is_set() or not put(read_q, item):
                return
        put(read_q, _DONE)

    def write_loop():
        while True:
            try:
                item = write_q.get(timeout=0.1)
            except queue.Empty:
                item = None
            if stop.is_set():  # interrupted or failed: leave promptly, write nothing more
                return
            if item is None:
                continue
            if item is _DONE:
                return
            name, tensor = item
            if isinstance(tensor, tuple):  # (pinned host tensor, CUDA event): wait for the copy to land
                tensor, done = tensor
                done.synchronize()
            writer.write(name, tensor)
            result.bytes_written += tensor.numel() * tensor.element_size()

    readers, writers = _Worker(reader, "merge-cli-reader"), _Worker(write_loop, "merge-cli-writer")
    readers.start()
    writers.start()

    def check_workers():
        for worker in (readers, writers):
            if worker.error:
                raise worker.error from None

    try:
        while True:
            try:
                item = read_q.get(timeout=0.1)
            except queue.Empty:
                check_workers()
                continue
            if item is _DONE:
                break
            job, held, base, inputs, pre = item
            if inputs is None:
                per_row = working_bytes(plan, job) / job.shape[0]
                rows = max(1, int((budget // 4) / per_row))
                stats = compute.chunked(
                    job, rows, lambda t, job=job: put(write_q, (job.name, t)) or check_workers()
                )
                result.chunked.append(job.name)
            else:
                out, stats = compute.whole(job, base, inputs, pre)
                del base, inputs, pre
                gate.release(held)
                put(write_q, (job.name, out))
                del out
            if opts.on_stats:
                opts.on_stats(job, stats)
            if delay:
                time.sleep(delay)
            nbytes = job_inputs_bytes(plan, job)
            result.bytes_read += nbytes
            result.tensors.append(stats)
            check_workers()
            if opts.progress:
                opts.progress(job, nbytes)
        put(write_q, _DONE)
        writers.join()
        check_workers()
    finally:
        stop.set()
        readers.join(timeout=5)
        writers.join(timeout=5)
    result.seconds = time.perf_counter() - start
    return result
