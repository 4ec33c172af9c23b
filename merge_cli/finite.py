"""NaN / Inf detection in source tensors: a corrupt download should stop a merge, not poison its output."""

from __future__ import annotations

import torch

from merge_cli.errors import CheckpointError

ALLOW_HINT = "pass --allow-nonfinite to merge anyway"


def count_nonfinite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, +-Inf count) of a floating tensor; (0, 0) for integer and bool tensors."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0, 0
    # fast path: NaN and Inf propagate through a sum, so a finite float32 sum proves every entry finite;
    # one reduction with no temporary (isfinite().all() allocates a mask and is several times slower).
    # Only a non-finite sum (a bad value, or a rare overflow of large finite ones) pays for the exact count.
    if bool(torch.isfinite(t.sum(dtype=torch.float32 if t.dtype != torch.float64 else torch.float64))):
        return 0, 0
    if bool(torch.isfinite(t).all()):
        return 0, 0
    nan = int(torch.isnan(t).sum())
    return nan, int(torch.isinf(t).sum())


def describe_nonfinite(nan: int, inf: int, numel: int) -> str:
    parts = [f"{nan} NaN"] if nan else []
    parts += [f"{inf} Inf"] if inf else []
    return f"{' and '.join(parts)} value(s) out of {numel}"


def ensure_finite(plan, ref, t: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
    """Raise a CheckpointError naming the model and tensor when t (a job input, or rows of one) has NaN/Inf."""
    nan, inf = count_nonfinite(t)
    if nan or inf:
        label = plan.models[ref.model].label
        where = f" in rows {rows[0]}..{rows[1] - 1}" if rows else ""
        raise CheckpointError(
            f"model '{label}': tensor '{ref.name}' holds {describe_nonfinite(nan, inf, t.numel())}{where}; "
            f"the file may be corrupt; {ALLOW_HINT}"
        )


def check_finite_inputs(plan, job, base: torch.Tensor | None, inputs: list[torch.Tensor]) -> None:
    """ensure_finite over a job's base and inputs, in that order."""
    refs = ([job.base] if job.base is not None else []) + list(job.inputs)
    tensors = ([base] if base is not None else []) + list(inputs)
    for ref, t in zip(refs, tensors, strict=True):
        ensure_finite(plan, ref, t)
