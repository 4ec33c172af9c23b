"""The streaming engine: a MergePlan in, a written model out, one tensor at a time in bounded memory.

- pipeline.py: run_merge, the reader / compute / writer threads and their bounded queues.
- compute.py: one tensor merged whole on the compute device (fast kernels when they apply, else plain).
- chunked.py: tensors too big for the memory budget merged in row chunks.
- jobs.py: a job's sizes, reads, context and parameters as the kernels receive them.
- stats.py: statistics passes of whole-model methods, run before the loop.
- resume.py: --resume: what an interrupted run left, verified, and the glue that reuses it.
- journal.py: the journal lines (completed shards, pieces of the shard in flight), written and read.
- options.py: EngineOptions / EngineResult, device and memory budget.
"""

from merge_cli.engine.compute import _Compute  # the per-tensor compute step (tests wrap its methods)
from merge_cli.engine.jobs import read_job, working_bytes
from merge_cli.engine.options import (
    TEST_DELAY_ENV,
    EngineOptions,
    EngineResult,
    default_max_memory,
    resolve_device,
)
from merge_cli.engine.pipeline import run_merge

__all__ = [
    "_Compute",
    "TEST_DELAY_ENV",
    "EngineOptions",
    "EngineResult",
    "default_max_memory",
    "read_job",
    "resolve_device",
    "run_merge",
    "working_bytes",
]
