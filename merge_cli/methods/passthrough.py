"""Passthrough: copy one model's tensor (optionally scaled); with slices, stack layers (METHODS.md §12)."""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class PassthroughParams(MethodParams):
    scale: float = Field(1.0, description="multiply the copied tensor by this factor")


def passthrough(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    return tensors[0] if p.scale == 1.0 else tensors[0] * p.scale


SPEC = MethodSpec(
    name="passthrough",
    title="Passthrough (copy, or stack layer ranges with slices)",
    paper="Frankenmerging / layer stacking, e.g. Kim et al. 2023, SOLAR 10.7B: depth up-scaling, arXiv:2312.15166",
    params=PassthroughParams,
    kernel=passthrough,
    needs_base=False,
    max_models=1,
    summary="output tensor = the one source tensor (x scale); slices stack layer ranges of several models",
    mergekit_defaults={},
    elementwise=True,
)
