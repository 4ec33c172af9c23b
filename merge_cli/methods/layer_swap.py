"""Layer swapping (METHODS.md §12): whole transformer layers from a donor expert into the task expert.

base_model = the task expert theta_T; the single source model = the donor theta_L (the language expert).
Over L layers: l < bottom and l >= L - top come from the donor, bit for bit; the transition zones
bottom <= l < bottom + transition_bottom and L - top - transition_top <= l < L - top are
w * theta_L + (1 - w) * theta_T (w = transition_weight); every other layer is theta_T, bit for bit.
Tensors outside the layer stack (embeddings, final norm, head) follow `non_layer`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class LayerSwapParams(MethodParams):
    bottom: int = Field(5, ge=0, description="bottom layers taken from the donor")
    top: int = Field(2, ge=0, description="top layers taken from the donor")
    transition_bottom: int = Field(1, ge=0, description="mixed layers just above the bottom block")
    transition_top: int = Field(1, ge=0, description="mixed layers just below the top block")
    transition_weight: float = Field(0.5, ge=0.0, le=1.0, description="donor share in the transition layers")
    non_layer: Literal["base", "donor", "average"] = Field(
        "base",
        description="embeddings, final norm, head: from the task expert (base), the donor, or their mean",
    )


def source_of(layer: int | None, num_layers: int, p: ParamSet) -> str:
    """'donor', 'base', 'mix' or 'average' for a tensor of this layer (None: outside the layer stack)."""
    if layer is None:
        return {"base": "base", "donor": "donor", "average": "average"}[p.non_layer]
    if layer < p.bottom or layer >= num_layers - p.top:
        return "donor"
    if layer < p.bottom + p.transition_bottom or layer >= num_layers - p.top - p.transition_top:
        return "mix"
    return "base"


def layer_swap(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    src = source_of(ctx.layer, ctx.num_layers or 0, p)
    ctx.stats["source"] = src
    if src == "donor":
        return tensors[0]  # unchanged values: the cast back to the input dtype is exact
    if src == "base":
        return base
    w = p.transition_weight if src == "mix" else 0.5
    return w * tensors[0] + (1.0 - w) * base


def plan_check(params: list[ParamSet], num_layers: int | None) -> str | None:
    if num_layers is None:
        return "the models have no numbered layers (model.layers.N.*) to swap"
    for p in params:
        used = p.bottom + p.transition_bottom + p.transition_top + p.top
        if used > num_layers:
            return (
                f"bottom + transition_bottom + transition_top + top = {used} but the model has {num_layers} layers; "
                "make them smaller"
            )
    return None


SPEC = MethodSpec(
    name="layer_swap",
    title="Layer swapping (bottom/top layers from a donor expert)",
    paper="Bandarkar et al. 2025, Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models, "
    "ICLR 2025, arXiv:2410.01335",
    params=LayerSwapParams,
    kernel=layer_swap,
    needs_base=True,
    min_models=1,
    max_models=1,
    summary="layer l: donor if l < bottom or l >= L - top; w*donor + (1-w)*base in the transition zones; else base",
    plan_check=plan_check,
    mergekit_defaults={},
    elementwise=True,
)
