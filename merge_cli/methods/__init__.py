"""The method registry: name in YAML == registry key == module name."""

from __future__ import annotations

from merge_cli.errors import RecipeError, did_you_mean
from merge_cli.methods import (
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    emr,
    iso_c,
    iso_cts,
    karcher,
    layer_swap,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    pcb,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model

METHODS: dict[str, MethodSpec] = {m.SPEC.name: m.SPEC for m in (linear, task_arithmetic, ties, passthrough)}
METHODS.update({s.name: s for s in (
    dare.DARE_LINEAR,
    dare.DARE_TIES,
    breadcrumbs.BREADCRUMBS,
    breadcrumbs.BREADCRUMBS_TIES,
    della.DELLA,
    della.DELLA_LINEAR,
    model_stock.SPEC,
    slerp.SLERP,
    slerp.NUSLERP,
    multislerp.SPEC,
    karcher.SPEC,
    sce.SPEC,
    nearswap.SPEC,
    ram.RAM,
    ram.RAMPLUS_TL,
    arcee_fusion.SPEC,
)})  # fmt: skip
# issue 4: whole-model (pcb, ties granularity model, emr) and per-matrix SVD (tsv, iso_c, iso_cts) methods, layer swapping
METHODS.update({m.SPEC.name: m.SPEC for m in (pcb, layer_swap, tsv, iso_c, iso_cts, emr)})


def get_method(name: str, where: str = "method") -> MethodSpec:
    spec = METHODS.get(name)
    if spec is None:
        raise RecipeError(
            f"{where}: unknown merge method '{name}'{did_you_mean(name, METHODS)}; `merge-cli methods` lists them"
        )
    return spec


__all__ = ["METHODS", "MethodParams", "MethodSpec", "ParamSet", "TensorCtx", "get_method", "per_model"]
