"""The streaming loop: read -> kernel -> cast -> write, one tensor at a time, overlapped.

A reader thread prefetches the next jobs' input tensors (bounded by bytes), the calling thread runs the
kernels on the compute device (compute.py; chunked.py for tensors too big to merge whole), and a writer
thread streams finished tensors into their shards.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import torch

from merge_cli.engine.compute import _Compute
from merge_cli.engine.jobs import _bitwise_copy, _params, can_chunk, job_inputs_bytes, read_job, working_bytes
from merge_cli.engine.options import (
    TEST_DELAY_ENV,
    EngineOptions,
    EngineResult,
    _return_freed_memory,
    default_max_memory,
    resolve_device,
)
from merge_cli.engine.stats import run_stats_passes, whole_model_job
from merge_cli.errors import MergeCliError
from merge_cli.io.writer import ShardedWriter
from merge_cli.methods import METHODS
from merge_cli.plan import MergePlan

_DONE = object()


def use_fused(mode: str, plan: MergePlan, device: torch.device) -> bool:
    """The blocked CPU kernels (kernels/blocked.py) serve linear, task_arithmetic and TIES on the CPU unless --fused off."""
    if mode not in ("auto", "on", "off"):
        raise MergeCliError(f"--fused {mode}: use auto, on or off")
    return mode != "off" and device.type == "cpu"


def all_blocked(plan: MergePlan) -> bool:
    """Does every job run on the blocked CPU kernels (kernels/blocked.py) or as a plain copy? The methods of
    route.TORCH_REDUCTIONS do not count: their fast kernels reduce with torch, whose order depends on the
    thread count, so they keep the plain kernels' threads."""
    from merge_cli.kernels.dispatch import applies
    from merge_cli.kernels.route import TORCH_REDUCTIONS

    return all(
        (applies(j.method, _params(j)) and not whole_model_job(j) and j.method not in TORCH_REDUCTIONS)
        or _bitwise_copy(METHODS[j.method], j)
        for j in plan.jobs
    )


class _Prefetch:
    """Keeps the kernel reading up to AHEAD bytes of the next jobs' inputs into the page cache
    (Checkpoint.prefetch: fadvise WILLNEED) while the reader maps the current one: with a cold page cache
    the disk then has several requests in flight instead of the one page fault the reader waits on.
    Pages already cached cost a lookup."""

    AHEAD = 256 << 20

    def __init__(self, plan: MergePlan, skip):
        self.plan, self.skip = plan, skip
        self.next = 0  # the first job not asked for yet
        self.asked: list[tuple[int, int]] = []  # (job index, bytes asked for)

    def advance(self, i: int) -> None:
        self.asked = [(j, n) for j, n in self.asked if j > i]
        jobs = self.plan.jobs
        self.next = max(self.next, i + 1)
        while self.next < len(jobs) and sum(n for _, n in self.asked) < self.AHEAD:
            j, self.next = self.next, self.next + 1
            if j in self.skip:
                continue
            job = jobs[j]
            n = 0
            for ref in ([job.base] if job.base else []) + job.inputs:
                try:  # a hint: a checkpoint kind that cannot take it (an overlay, a view) is read as usual
                    n += self.plan.models[ref.model].checkpoint.prefetch(ref.name)
                except (AttributeError, KeyError, OSError):
                    pass
            self.asked.append((j, n))


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
        from merge_cli.kernels.interp import release

        release()  # the fast interpolation kernels' scratch buffers of this (compute) thread


def _run_merge(plan: MergePlan, writer: ShardedWriter, opts: EngineOptions) -> EngineResult:
    device = resolve_device(opts.device)
    _return_freed_memory()
    budget = opts.max_memory or default_max_memory()
    result = EngineResult(device=str(device), max_memory=budget)
    on = use_fused(opts.fused, plan, device)
    off = "--fused off" if opts.fused == "off" else f"the fast kernels are CPU-only (device {device.type})"
    compute = _Compute(plan, device, on, None if on else off)
    if compute.fused:  # a first run builds the native kernels while the first tensors are read
        from merge_cli.kernels import native

        native.warm_up()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    elif compute.fused and all_blocked(plan):
        # The blocked kernels run one op per ~1 MB block: splitting each op over threads costs more in
        # wake-ups than it gains, and the other cores serve the reader, writer and hasher threads. (A
        # tensor that falls to the plain kernels after all, e.g. bf16 compute without a compiler, gives
        # the threads back: _Compute.ran_plain.)
        compute.restore_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    compute.check_finite = not opts.allow_nonfinite
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    big = {
        id(j) for j in plan.jobs if can_chunk(METHODS[j.method], j) and working_bytes(plan, j) > budget // 2
    }
    start = time.perf_counter()
    # whole-model methods: their statistics passes stream the models first (merge_cli/engine/stats.py)
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

    ahead = _Prefetch(plan, opts.skip_jobs)

    def reader():
        for i, job in enumerate(plan.jobs):
            if i in opts.skip_jobs:
                continue
            ahead.advance(i)
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
    result.kernels = compute.log.line()
    return result
