"""Linear average: model soups, checkpoint averaging (METHODS.md §1).

    theta = sum_i w_i theta_i / sum_i w_i      (the division only with normalize)

The sum is accumulated in fp32 (float64 for float64 inputs) with each product fused into its add (one
rounding per model, none for the product; w_i rounded to the accumulator dtype), divided there, and
rounded once to the compute dtype: for bf16/fp16 compute this is far more accurate than adding in the
half dtype, and it is mergekit's order (addcmul into an fp32 buffer). The blocked CPU kernel (kernels/blocked.py)
does the same operations. `numerics` only changes the divisor: exact, the float64 sum of the weights
(rounded once); mergekit, the fp32 sum of the fp32-rounded weights, as mergekit forms it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    TensorCtx,
    mergekit_numerics,
    numerics_param,
    per_model,
)
from merge_cli.methods.task_arithmetic import accumulator, weighted_sum


class LinearParams(MethodParams):
    weight: float = per_model(1.0, description="weight of this model in the average")
    normalize: bool = Field(True, description="divide by the sum of weights (a weighted mean)")
    numerics: Numerics = numerics_param(
        "normalize divides by the float64 sum of the weights",
        "by the fp32 sum of the fp32-rounded weights, as mergekit 0.1.5, to match its output bits",
    )


def _check(p: ParamSet, n: int) -> str | None:
    if p.normalize and abs(sum(p.weight)) < 1e-12:
        return "weights sum to 0 with normalize: true; give non-zero weights or set normalize: false"
    return None


def divisor(weights, p: ParamSet, dtype: torch.dtype) -> float:
    """What normalize divides by: the float64 sum of the weights (exact), or (numerics: mergekit) mergekit's
    sum of the weights rounded to the accumulator dtype, summed in it."""
    if mergekit_numerics(p):
        return float(torch.tensor([list(weights)], dtype=accumulator(dtype)).sum(dim=1))
    return float(sum(weights))


def linear(base, tensors: list[torch.Tensor], weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    # the same operations, in the same order, as the fused kernel (merge_cli/kernels/blocked.py), so both agree bitwise
    dtype = tensors[0].dtype
    out = weighted_sum(tensors, list(weights), tensors[0], fma=True, out_dtype=accumulator(dtype))
    if p.normalize:
        out.div_(divisor(weights, p, dtype))
    return out.to(dtype)


SPEC = MethodSpec(
    name="linear",
    title="Linear average (model soups)",
    paper="Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models, arXiv:2203.05482",
    params=LinearParams,
    kernel=linear,
    needs_base=False,
    summary="theta = sum_i w_i theta_i / sum_i w_i (no base needed)",
    check=_check,
    mergekit_defaults={"numerics": "mergekit"},
    elementwise=True,
)

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU, by method name: the blocked
# runner, then the primitives it calls (native C, with the eager blocked form as the fallback).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "linear": (
        "merge_cli.kernels.dispatch.run_linear",
        "merge_cli.kernels.native.linear",
        "merge_cli.kernels.blocked.linear",
    ),
}
