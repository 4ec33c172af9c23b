"""Parameter resolution: precedence and gradients (lists interpolated across layer depth)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from merge_cli.errors import PlanError
from merge_cli.methods.base import MethodSpec, ParamSet

_MISSING = object()


def at_depth(value: Any, t: float) -> Any:
    """A scalar as is; a numeric list interpolated piecewise-linearly at t in [0, 1]; other lists: the nearest entry."""
    if not isinstance(value, list):
        return value
    n = len(value)
    if n == 1:
        return value[0]
    s = min(max(t, 0.0), 1.0) * (n - 1)
    i = min(int(math.floor(s)), n - 2)
    frac = s - i
    a, b = value[i], value[i + 1]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numeric:
        return a + (b - a) * frac if frac else a
    return value[min(int(math.floor(s + 0.5)), n - 1)]  # the nearest entry


def _is_filter_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(hasattr(e, "value") or (isinstance(e, dict) and "value" in e) for e in value)
    )


def pick(value: Any, name: str | None) -> Any:
    """A filter list [{filter, value}] -> the value of the first entry whose filter is a substring of `name`
    (no filter or '*' matches every name); _MISSING when none matches. Anything else is returned as is."""
    if not _is_filter_list(value):
        return value
    for e in value:
        f = e.get("filter") if isinstance(e, dict) else e.filter
        v = e.get("value") if isinstance(e, dict) else e.value
        if f is None or f == "*" or f in (name or ""):
            return v
    return _MISSING


def first_given(key: str, *layers: dict | None, name: str | None = None) -> Any:
    """The value of `key` in the first layer that gives it; a filter list that matches nothing falls through."""
    for layer in layers:
        if layer and key in layer:
            v = pick(layer[key], name)
            if v is not _MISSING:
                return v
    return _MISSING


class ParamResolver:
    """Builds validated ParamSets; identical inputs share one validated instance."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Any] = {}

    def validate(self, spec: MethodSpec, values: dict[str, Any], tensor: str) -> Any:
        key = (spec.name, tuple(sorted(values.items())))
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = spec.params.model_validate(values)
            except ValidationError as err:
                e = err.errors()[0]
                loc = ".".join(str(x) for x in e["loc"])
                raise PlanError(
                    f"tensor '{tensor}': parameter '{loc}' of {spec.name} resolves to {e.get('input')!r}: {e['msg']}"
                ) from None
            self._cache[key] = hit
        return hit

    def resolve(
        self,
        spec: MethodSpec,
        tensor: str,
        t: float,
        global_layers: list[dict | None],
        model_layers: list[list[dict | None]],
        input_names: list[str] | None = None,
    ) -> ParamSet:
        """global_layers: parameter dicts, highest precedence first (override, slice, top level).
        model_layers: per source model, its own dicts (highest first), consulted before global_layers
        for per-model parameters. Filter lists of global parameters match the output tensor name
        `tensor`; those of a per-model parameter match that model's input name (input_names[i])."""
        per_model = spec.params.per_model_fields()
        globals_: dict[str, Any] = {}
        for fname in spec.params.model_fields:
            if fname in per_model:
                continue
            key = spec.params.key_of(fname)
            v = first_given(key, *global_layers, name=tensor)
            if v is not _MISSING:
                globals_[key] = at_depth(v, t)
        instances = []
        for i, layers in enumerate(model_layers or [[]]):
            values = dict(globals_)
            in_name = input_names[i] if input_names and i < len(input_names) else tensor
            for fname in per_model:
                key = spec.params.key_of(fname)
                v = first_given(key, *layers, *global_layers, name=in_name)
                if v is not _MISSING:
                    values[key] = at_depth(v, t)
            instances.append(self.validate(spec, values, tensor))
        out: dict[str, Any] = {}
        for fname in spec.params.model_fields:
            if fname in per_model:
                out[fname] = tuple(getattr(inst, fname) for inst in instances) if model_layers else ()
            else:
                out[fname] = getattr(instances[0], fname)
        return ParamSet(out)
