"""Fused CPU kernels (torch.compile / inductor) for the hot methods: linear, task_arithmetic and TIES.

An eager merge makes a dozen passes over memory per tensor (convert, subtract, compare, mask, ...); the
compiled kernels do the whole chain in one loop over the raw (e.g. bf16) inputs, converting to fp32 in
registers and writing the output dtype directly. Results are bitwise equal to the eager kernels (tested).

Compiling costs seconds to a minute once per kernel shape family (inductor caches the code on disk for
later runs), so the engine uses these only for large merges (`--fused auto`) or when asked (`--fused on`),
and falls back to the eager kernels, with one warning, if compiling fails (no C compiler, say).
"""

from __future__ import annotations

import warnings

import torch

_failed = False


def _compile(fn):
    compiled = None

    def call(*args):
        nonlocal compiled
        global _failed
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        try:
            return compiled(*args)
        except Exception as e:  # no compiler, unsupported platform: the eager kernel takes over
            _failed = True
            warnings.warn(
                f"merge-cli: fused kernels unavailable ({type(e).__name__}: {e}); using eager kernels",
                stacklevel=2,
            )
            return None

    return call


def available() -> bool:
    return not _failed


def _bad(tensors: list[torch.Tensor]) -> torch.Tensor:
    """NaN/Inf count of each input, computed in the same loop as the merge (no extra pass over memory)."""
    return torch.stack([(~torch.isfinite(t.to(torch.float32))).sum() for t in tensors])


def _sq(taus: list[torch.Tensor]) -> torch.Tensor:
    """Squared norm of each task vector (float64 sums), for the report, from the same loop."""
    return torch.stack([(t * t).to(torch.float64).sum() for t in taus])


def _linear(xs: list[torch.Tensor], w: torch.Tensor, divisor: torch.Tensor, out_dtype: torch.dtype):
    acc = xs[0].to(torch.float32) * w[0]
    for i in range(1, len(xs)):
        acc = acc + xs[i].to(torch.float32) * w[i]
    return (acc / divisor).to(out_dtype), _bad(xs)


def _task_arithmetic(
    base, xs: list[torch.Tensor], w: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
):
    b = base.to(torch.float32)
    taus = [x.to(torch.float32) - b for x in xs]
    delta = taus[0] * w[0]
    for i in range(1, len(xs)):
        delta = delta + taus[i] * w[i]
    return (b + delta * scale).to(out_dtype), _bad([base, *xs]), _sq(taus)


def _ties(
    base, xs: list[torch.Tensor], thr: torch.Tensor, cutoff: torch.Tensor, offset: torch.Tensor,
    w: torch.Tensor, lam: torch.Tensor, weighted: bool, mean: bool, out_dtype: torch.dtype,
):  # fmt: skip
    """TIES given each model's threshold: keep |tau| > thr, and |tau| == thr at flat index < cutoff."""
    b = base.to(torch.float32)
    index = torch.arange(b.numel(), device=b.device).reshape(b.shape) + offset
    trimmed = []
    taus = []
    for i in range(len(xs)):
        t = xs[i].to(torch.float32) - b
        taus.append(t)
        a = t.abs()
        keep = (a > thr[i]) | ((a == thr[i]) & (index < cutoff[i]))
        trimmed.append(torch.where(keep, t, 0.0))
    total = trimmed[0] * w[0] if weighted else trimmed[0]
    for i in range(1, len(xs)):
        total = total + (trimmed[i] * w[i] if weighted else trimmed[i])
    sign = torch.where(total >= 0, 1.0, -1.0)
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    kept = []
    touched = torch.zeros_like(b, dtype=torch.bool)
    conflict = torch.zeros_like(b, dtype=torch.bool)
    for i in range(len(xs)):
        along = trimmed[i] * sign
        agree = along > 0
        num = num + torch.where(agree, trimmed[i] * w[i], 0.0)
        den = den + torch.where(agree, w[i], 0.0)
        kept.append((trimmed[i] != 0).sum())
        touched = touched | agree
        conflict = conflict | (along < 0)
    merged = num / torch.where(den == 0, 1.0, den) if mean else num
    return (
        (b + merged * lam).to(out_dtype),
        torch.stack(kept),
        touched.sum(),
        conflict.sum(),
        _bad([base, *xs]),
        _sq(taus),
    )


def _band(base, x, lo: torch.Tensor, hi: torch.Tensor):
    """For |x - base|, one byte per entry: 0 below lo, 1 in [lo, hi], 2 above hi (one pointwise pass)."""
    a = (x.to(torch.float32) - base.to(torch.float32)).abs()
    return (a >= lo).to(torch.uint8) + (a > hi).to(torch.uint8)


band = _compile(_band)
linear = _compile(_linear)
task_arithmetic = _compile(_task_arithmetic)
ties = _compile(_ties)
