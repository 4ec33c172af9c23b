"""What a caller asks of the engine (EngineOptions), what it reports back (EngineResult), and the few
process-level settings it resolves: the compute device, the memory budget, glibc's trim thresholds."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merge_cli.errors import MergeCliError
from merge_cli.plan import TensorJob


@dataclass
class EngineOptions:
    device: str = "auto"
    threads: int | None = None
    max_memory: int | None = None  # bytes; default: default_max_memory()
    fused: str = (
        "auto"  # auto | on | off: blocked CPU kernels (kernels/blocked.py) for linear, task_arithmetic, ties
    )
    progress: Callable[[TensorJob, int], None] | None = None  # called after each job with its input bytes
    on_pass: Callable[[dict[str, Any]], None] | None = None  # called after each whole-model statistics pass
    # -- reliability (issue 6) --
    allow_nonfinite: bool = False  # else a NaN/Inf in any job input stops the merge, naming model and tensor
    skip_jobs: frozenset[int] = (
        frozenset()
    )  # plan.jobs positions an interrupted run wrote (--resume): not read
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
    kernels: str = "plain"  # plain torch, or on the CPU: native (merge_cli/kernels/native) / eager blocked (kernels/blocked.py)
    max_memory: int = 0
    chunked: list[str] = field(default_factory=list)
    stats_passes: list[dict[str, Any]] = field(
        default_factory=list
    )  # whole-model statistics passes (engine/stats.py)
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
