"""Which kernels merge a tensor, and the one line of the merge report (engine.kernels) that says so.

A tensor runs on the fast kernels when the blocked path is on (CPU, not `--fused off`), its method has a
fast kernel for its parameters (dispatch.applies), and the compute dtype is served: fp32 everywhere
(native, or eager without a compiler), bf16/fp16 on the native kernels; linear, slerp, nuslerp and
model_stock in any dtype without a compiler too (route.ANY_DTYPE); della and sce on the native kernels only. Otherwise the plain kernels run, and the reason is recorded, so a recipe that merges slowly says
why: `plain kernels: multislerp has no fast path`, `plain kernels: bf16 compute needs the native kernels (no C
compiler found (set CC))`.
"""

from __future__ import annotations

import threading

import torch

from merge_cli.kernels import native
from merge_cli.kernels.dispatch import FUSED_METHODS, applies
from merge_cli.kernels.route import dtype_name, fast_path

__all__ = ["KernelLog", "dtype_name", "fast_label", "fast_path", "why_plain"]


def why_plain(method: str, params, cd: torch.dtype) -> str | None:
    """Why a (non-copy) tensor of this method merges on the plain kernels; None when a fast one applies."""
    if method not in FUSED_METHODS:
        return f"{method} has no fast path"
    if not applies(method, params):
        return f"{method} with these parameters has no fast path"
    return fast_path([method], cd)


def fast_label() -> str:
    """What the fast path runs on here: native, or eager blocked (and why not native)."""
    why = native.unavailable_reason() if native.lib() is None else None
    return "native" if why is None else f"eager blocked ({why})"


class KernelLog:
    """Counts the tensors each kind of kernel merged (thread-safe) and says it in one line."""

    def __init__(self, off_reason: str | None = None):
        self.off = off_reason  # the blocked path is off for the whole merge (--fused off, CUDA)
        self.fast = 0
        self.plain: dict[str, int] = {}
        self._lock = threading.Lock()

    def ran_fast(self) -> None:
        with self._lock:
            self.fast += 1

    def ran_plain(self, reason: str) -> None:
        with self._lock:
            self.plain[reason] = self.plain.get(reason, 0) + 1

    def line(self) -> str:
        if self.off is not None:
            return f"plain kernels: {self.off}"
        reasons = "; ".join(self.plain)
        if not self.fast and self.plain:
            return f"plain kernels: {reasons}"
        label = fast_label()
        if not self.plain:
            return label
        n = sum(self.plain.values())
        return f"{label} ({n} tensor(s) on plain kernels: {reasons})"
