"""Task arithmetic: theta0 + lambda * sum_i w_i tau_i (METHODS.md §2)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model

# Fast kernels (merge_cli/kernels) serving this file's methods on the CPU, by method name: the blocked
# runner, then the primitives it calls (native C, with the eager blocked form as the fallback).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "task_arithmetic": (
        "merge_cli.kernels.dispatch.run_task_arithmetic",
        "merge_cli.kernels.native.task_arithmetic",
        "merge_cli.kernels.blocked.task_arithmetic",
    ),
}


class TaskArithmeticParams(MethodParams):
    weight: float = per_model(1.0, description="scale of this model's task vector")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the summed task vector")
    normalize: bool = Field(False, description="divide the sum by the sum of weights")


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: fp32 for the half dtypes, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def weighted_sum(terms, weights, like: torch.Tensor, *, fma: bool = False, out_dtype=None) -> torch.Tensor:
    """sum_i w_i * term_i accumulated in fp32 for half dtypes (the compute dtype otherwise), rounded once to
    `out_dtype` (default: like's dtype), in order, without stacking. Two product roundings:

    - default: each product in the compute dtype (w_i rounded to it), as mergekit's task-arithmetic family
      forms them before its torch.sum over the stacked products (bitwise that sum, up to four terms);
    - fma: w_i rounded to the accumulator dtype and each product fused into its add (no product rounding),
      as mergekit's linear does (addcmul); more accurate than either rounding the product or adding in bf16.
    """
    acc_dtype = accumulator(like.dtype)
    acc = torch.zeros(like.shape, dtype=acc_dtype, device=like.device)
    for w, term in zip(weights, terms, strict=True):
        if fma:
            acc.addcmul_(term, torch.tensor(w, dtype=acc_dtype, device=like.device))
        else:
            acc += (term * torch.tensor(w, dtype=like.dtype, device=like.device)).to(acc_dtype)
    return acc.to(like.dtype if out_dtype is None else out_dtype)


def task_arithmetic(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    delta = weighted_sum((t - base for t in tensors), list(weights), base)  # bitwise mergekit's order
    if p.normalize:
        s = sum(weights)
        delta.div_(s if abs(s) >= 1e-8 else 1.0)
    return base + p.lambda_ * delta


SPEC = MethodSpec(
    name="task_arithmetic",
    title="Task arithmetic",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, ICLR 2023, arXiv:2212.04089",
    params=TaskArithmeticParams,
    kernel=task_arithmetic,
    needs_base=True,
    summary="theta = theta0 + lambda * sum_i w_i (theta_i - theta0)",
    mergekit_defaults={},
    elementwise=True,
)
