"""The method registry: name in YAML == registry key == module name."""

from __future__ import annotations

from merge_cli.errors import RecipeError, did_you_mean
from merge_cli.methods import (
    emr,
    iso_c,
    iso_cts,
    layer_swap,
    linear,
    passthrough,
    pcb,
    task_arithmetic,
    ties,
    tsv,
)
from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx, per_model

METHODS: dict[str, MethodSpec] = {
    m.SPEC.name: m.SPEC
    for m in (linear, task_arithmetic, ties, passthrough, pcb, layer_swap, tsv, iso_c, iso_cts, emr)
}


def get_method(name: str, where: str = "method") -> MethodSpec:
    spec = METHODS.get(name)
    if spec is None:
        raise RecipeError(
            f"{where}: unknown merge method '{name}'{did_you_mean(name, METHODS)}; `merge-cli methods` lists them"
        )
    return spec


__all__ = ["METHODS", "MethodParams", "MethodSpec", "ParamSet", "TensorCtx", "get_method", "per_model"]
