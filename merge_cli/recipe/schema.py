"""The recipe: pydantic models for the native YAML schema and load_recipe().

Every problem becomes one RecipeError line naming the file, the YAML line, the key, and a did-you-mean.
Parameter names and values are checked against the methods' own parameter models here, before any
checkpoint is opened.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_cli.dtypes import parse_dtype_name
from merge_cli.errors import RecipeError, did_you_mean
from merge_cli.methods import METHODS, MethodSpec
from merge_cli.modules import GROUPS
from merge_cli.recipe.yamlsrc import Loc, YamlSource, loc_str

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FilterEntry(_Strict):
    """One entry of a filter list: used when `filter` is a substring of the tensor name (no filter or '*': always)."""

    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


# a scalar, a gradient (numeric list across depth), or a filter list [{filter, value}] (first match wins;
# no match falls through to the next precedence level)
ParamValue = Union[Scalar, list[Scalar], list[FilterEntry]]


def _path_rev(v: Any) -> Any:
    """mergekit's ModelPath {path, revision} as `path@revision`; anything else as given."""
    if isinstance(v, dict) and set(v) <= {"path", "revision"} and isinstance(v.get("path"), str):
        return f"{v['path']}@{v['revision']}" if v.get("revision") else v["path"]
    return v


class ModelEntry(_Strict):
    model: str = Field(description="local folder, .safetensors file, or hub id org/name[@revision]")
    name: str | None = Field(None, description="short name used in overrides' model_parameters and reports")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _lora_key(cls, v):
        # `{model: BASE, lora: ADAPTER}` is the same source as `model: BASE+ADAPTER` (issue 7, io/lora.py);
        # either may be mergekit's {path, revision} mapping, as in a mergekit recipe
        if isinstance(v, dict):
            v = {k: (_path_rev(x) if k in ("model", "lora") else x) for k, x in v.items()}
            if v.get("lora") is not None and isinstance(v.get("model"), str):
                v["model"] = f"{v['model']}+{v.pop('lora')}"
        # `{model: BASE, pack: PACK.skillpack}` is `model: BASE+PACK.skillpack` (issue 16, merge_cli/skillpack)
        if isinstance(v, dict) and v.get("pack") is not None and isinstance(v.get("model"), str):
            v = dict(v)
            v["model"] = f"{v['model']}+{v.pop('pack')}"
        return v

    @property
    def label(self) -> str:
        return self.name or Path(self.model.rstrip("/")).name or self.model


class Override(_Strict):
    match: str | list[str] = Field("*", description="group names, globs, or 're:' regexes on tensor names")
    layers: tuple[int, int] | None = Field(None, description="layer range [start, end)")
    method: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, ParamValue]] = Field(default_factory=dict)

    @property
    def patterns(self) -> list[str]:
        return [self.match] if isinstance(self.match, str) else list(self.match)


class SliceSource(_Strict):
    model: str
    layers: tuple[int, int] = Field(validation_alias=AliasChoices("layers", "layer_range"))
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def model_path(cls, v):
        return _path_rev(v)


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    method: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class Recipe(_Strict):
    name: str | None = None
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] = Field(default_factory=list)
    method: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    overrides: list[Override] = Field(default_factory=list)
    dtype: str = Field("float32", description="compute dtype")
    out_dtype: str | None = Field(None, description="output dtype; default: the base (or first) model's")
    seed: int = 0
    shard_size: int | str = "5GB"
    donor: str | None = Field(None, description="model that donates config.json and tokenizer files")
    chat_template: str | None = Field(
        None, description="jinja text, a built-in name, or a listed model's label"
    )
    vocab: Literal["error", "crop", "pad_from_base"] = Field(
        "error",
        description="when vocabulary sizes differ: error, crop to the common size, or pad from the base",
    )
    outer_tensors: Literal["reference", "slices"] = Field(
        "reference",
        description="slices recipes: tensors outside the layer stack copied from the reference model, or merged "
        "(mergekit) from the first slice's sources (embeddings) and the last slice's (final norm, head) at t=0",
    )

    _path: Path | None = PrivateAttr(None)
    _source: YamlSource | None = PrivateAttr(None)
    _doc: int = PrivateAttr(0)  # which YAML document of the file (multi-stage recipes)

    @field_validator("base_model", mode="before")
    @classmethod
    def base_path(cls, v):
        return _path_rev(v)

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        if isinstance(v, list):
            return [{"model": x} if isinstance(x, str) else x for x in v]
        return v

    # -- derived ------------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path | None:
        return self._path.parent if self._path else None

    @property
    def path(self) -> Path | None:
        return self._path

    def where(self, loc: Loc) -> str:
        return self._source.where(loc, self._doc) if self._source else "recipe"

    def methods_used(self) -> list[str]:
        names = [self.method]
        names += [o.method for o in self.overrides if o.method]
        names += [s.method for s in self.slices if s.method]
        return list(dict.fromkeys(names))

    def shard_bytes(self) -> int:
        return parse_size(self.shard_size, self.where(("shard_size",)))


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.I)


def parse_size(value: int | str, where: str) -> int:
    """'5GB', '500MB', '2GiB', '1B' (a plain B suffix counts bytes) or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise RecipeError(f"{where}: shard_size must be positive")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise RecipeError(f"{where}: cannot read size '{value}'; write it like 5GB, 500MB or 2GiB")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).upper()
    base = 1024 if suffix.startswith("I") else 1000
    mult = {"": 1, "K": base, "M": base**2, "G": base**3, "T": base**4}[unit]
    n = int(num * mult)
    if n <= 0:
        raise RecipeError(f"{where}: shard_size must be positive")
    return n


# ---------------------------------------------------------------------------------------------
# pydantic errors -> one line


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of loc."""
    import typing

    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        while (
            typing.get_origin(ann) in (list, tuple, Union, dict)
            or str(typing.get_origin(ann)) == "types.UnionType"
        ):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            ann = models[0] if models else (args[-1] if args else None)
            if models:
                break
        cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _keys_of(cls: type[BaseModel]) -> list[str]:
    out = []
    for name, f in cls.model_fields.items():
        out.append(name)
        if isinstance(f.validation_alias, AliasChoices):
            out += [a for a in f.validation_alias.choices if isinstance(a, str)]
    return out


def _one_line(err: ValidationError, src: YamlSource, doc: int = 0) -> RecipeError:
    errors = err.errors()
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # drop pydantic's union-branch tags such as 'str', 'list[...]'
    loc = tuple(
        p
        for p in loc
        if isinstance(p, int) or not re.match(r"^(str|int|float|bool|list\[|tuple\[|dict\[)", p)
    )
    where = src.where(loc, doc)
    key = loc_str(loc)
    if e["type"] == "extra_forbidden":
        cls = _model_at(loc)
        hint = did_you_mean(loc[-1], _keys_of(cls)) if cls else ""
        return RecipeError(f"{where}: unknown key '{key}'{hint}")
    if e["type"] == "missing":
        return RecipeError(f"{where}: missing required key '{key}'")
    return RecipeError(f"{where}: {key}: {e['msg']} (got {e.get('input')!r})")


# ---------------------------------------------------------------------------------------------
# semantic checks


def _check_param_value(spec: MethodSpec, key: str, value: Any, where: str, what: str) -> None:
    if isinstance(value, list) and value and all(isinstance(v, FilterEntry) for v in value):
        for e in value:
            _check_param_value(spec, key, e.value, where, what)
        return
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise RecipeError(f"{where}: {what}: an empty list is not a value")
    for v in values:
        try:
            spec.params.model_validate({key: v})
        except ValidationError as err:
            mine = [e for e in err.errors() if e["loc"] and e["loc"][0] in (key, spec.params.field_of(key))]
            if mine:
                raise RecipeError(
                    f"{where}: {what}={v!r} is invalid for {spec.name}: {mine[0]['msg']}"
                ) from None


def _check_params(
    params: dict, specs: list[MethodSpec], loc: Loc, recipe: Recipe, per_model_only: bool = False
) -> None:
    for key, value in params.items():
        where = recipe.where((*loc, key))
        owners = [s for s in specs if s.params.field_of(key) is not None]
        if per_model_only:
            owners = [s for s in owners if s.params.field_of(key) in s.params.per_model_fields()]
        if not owners:
            known = sorted({k for s in specs for k in s.params.recipe_keys()})
            if per_model_only:
                known = sorted({s.params.key_of(f) for s in specs for f in s.params.per_model_fields()})
            kind = "per-model parameter" if per_model_only else "parameter"
            names = "/".join(s.name for s in specs)
            raise RecipeError(
                f"{where}: unknown {kind} '{key}' for {names}{did_you_mean(key, known)}; known: {', '.join(known) or 'none'}"
            )
        for s in owners:
            _check_param_value(s, key, value, where, loc_str((*loc, key)))


def _check_match(pattern: str, where: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise RecipeError(f"{where}: bad regex '{pattern[3:]}': {e}") from None
    elif not any(ch in pattern for ch in "*?[.") and pattern not in GROUPS:
        raise RecipeError(
            f"{where}: '{pattern}' is not a module group{did_you_mean(pattern, GROUPS)}; "
            f"use one of {', '.join(GROUPS)}, a glob like '*.q_proj.*', or 're:REGEX'"
        )


def _semantic_checks(r: Recipe) -> None:
    for loc, name in (
        [(("method",), r.method)]
        + [(("overrides", i, "method"), o.method) for i, o in enumerate(r.overrides) if o.method]
        + [(("slices", i, "method"), s.method) for i, s in enumerate(r.slices) if s.method]
    ):
        if name not in METHODS:
            raise RecipeError(
                f"{r.where(loc)}: unknown merge method '{name}'{did_you_mean(name, METHODS)}; `merge-cli methods` lists them"
            )
    top = METHODS[r.method]
    used = [METHODS[m] for m in r.methods_used()]
    if not r.models and not r.slices:
        raise RecipeError(f"{r.where(())}: the recipe lists no models; add `models:` (or `slices:`)")
    if r.models and r.slices:
        raise RecipeError(f"{r.where(('slices',))}: give either `models:` or `slices:`, not both")
    if top.needs_base and not r.base_model and not r.slices:
        raise RecipeError(
            f"{r.where(('method',))}: method '{top.name}' needs `base_model:`; add the pretrained model it fine-tunes from"
        )
    parse_dtype_name(r.dtype, r.where(("dtype",)))
    if r.out_dtype is not None:
        parse_dtype_name(r.out_dtype, r.where(("out_dtype",)))
    r.shard_bytes()
    labels = [m.label for m in r.models]
    for i, m in enumerate(r.models):
        if labels.count(m.label) > 1:
            raise RecipeError(
                f"{r.where(('models', i))}: two models are named '{m.label}'; give them distinct `name:`s"
            )
        _check_params(m.parameters, used, ("models", i, "parameters"), r, per_model_only=True)
    _check_params(r.parameters, used, ("parameters",), r)
    for i, o in enumerate(r.overrides):
        spec = METHODS[o.method] if o.method else top
        for p in o.patterns:
            _check_match(p, r.where(("overrides", i, "match")))
        if o.layers is not None and not 0 <= o.layers[0] < o.layers[1]:
            raise RecipeError(
                f"{r.where(('overrides', i, 'layers'))}: layer range {list(o.layers)} must be [start, end) with 0 <= start < end"
            )
        _check_params(o.parameters, [spec], ("overrides", i, "parameters"), r)
        for label, ps in o.model_parameters.items():
            if label not in labels:
                raise RecipeError(
                    f"{r.where(('overrides', i, 'model_parameters', label))}: no model named '{label}'{did_you_mean(label, labels)}"
                )
            _check_params(ps, [spec], ("overrides", i, "model_parameters", label), r, per_model_only=True)
        if spec.needs_base and not r.base_model:
            raise RecipeError(
                f"{r.where(('overrides', i, 'method'))}: method '{spec.name}' needs `base_model:`"
            )
    for i, s in enumerate(r.slices):
        spec = METHODS[s.method] if s.method else top
        _check_params(s.parameters, [spec], ("slices", i, "parameters"), r)
        n = {src.layers[1] - src.layers[0] for src in s.sources}
        for j, src in enumerate(s.sources):
            _check_params(
                src.parameters, [spec], ("slices", i, "sources", j, "parameters"), r, per_model_only=True
            )
            if not 0 <= src.layers[0] < src.layers[1]:
                raise RecipeError(
                    f"{r.where(('slices', i, 'sources', j))}: layer range {list(src.layers)} must be [start, end) with 0 <= start < end"
                )
        if len(n) > 1:
            raise RecipeError(
                f"{r.where(('slices', i, 'sources'))}: all sources of a slice must span the same number of layers"
            )
        if (
            spec.max_models is not None
            and len(s.sources) > spec.max_models
            and not (spec.name == "passthrough")
        ):
            raise RecipeError(
                f"{r.where(('slices', i, 'sources'))}: method '{spec.name}' takes at most {spec.max_models} models"
            )
        if spec.name == "passthrough" and len(s.sources) != 1:
            raise RecipeError(
                f"{r.where(('slices', i, 'sources'))}: passthrough slices take exactly one source each"
            )
    if r.models:
        for spec, loc in [(top, ("method",))] + [
            (METHODS[o.method], ("overrides", i, "method")) for i, o in enumerate(r.overrides) if o.method
        ]:
            n = len(_sources_for(r, spec))
            if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
                want = f"{spec.min_models}" + (
                    f"-{spec.max_models}" if spec.max_models != spec.min_models else ""
                )
                if spec.max_models is None:
                    want = f"at least {spec.min_models}"
                raise RecipeError(
                    f"{r.where(loc)}: method '{spec.name}' takes {want} source model(s); the recipe gives {n}"
                )
    if r.donor is not None and r.donor not in ("base", *labels, *(m.model for m in r.models), r.base_model):
        raise RecipeError(
            f"{r.where(('donor',))}: donor '{r.donor}' is not 'base' or a listed model{did_you_mean(r.donor, ['base', *labels])}"
        )


def _sources_for(r: Recipe, spec: MethodSpec) -> list[ModelEntry]:
    """The source models a method merges: with a base, the base itself is not a source."""
    if spec.needs_base or (spec.optional_base and r.base_model):
        return [m for m in r.models if m.model != r.base_model]
    return list(r.models)


def sources_for(r: Recipe, spec: MethodSpec) -> list[ModelEntry]:
    return _sources_for(r, spec)


def match_tensor(patterns: list[str], name: str, group: str) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif p in GROUPS:
            if p == group:
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False
