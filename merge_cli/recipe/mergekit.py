"""mergekit recipe compatibility: translate a mergekit-format YAML document into a native recipe.

A document with a `merge_method` key is a mergekit recipe (docs/mergekit-compat.md). `translate` maps it
onto the native schema, which can express all of it:

- merge_method -> method; base_model, models[].parameters, slices[].sources[].layer_range/parameters,
  slices[].parameters and top-level parameters keep their shape (gradients and filter lists included);
- a `models:` recipe whose method merges every input (no base role, e.g. linear) gets the base appended to
  its models, as mergekit does;
- the method's `mergekit_defaults` become explicit top-level parameters (the lowest precedence level), so
  that a value mergekit leaves at its own default resolves to mergekit's default, not merge-cli's;
- mergekit parameter names merge-cli spells differently are renamed (ties `normalize` -> `merge_func`),
  and parameters that change nothing numerically (`int8_mask`) are dropped;
- slices recipes merge the tensors outside the layer stack like mergekit (`outer_tensors: slices`);
- dtype (the compute dtype in mergekit too) and out_dtype (default: dtype); tokenizer_source/tokenizer
  -> donor; chat_template kept.

Only the recipe's text is translated: no model is opened. Errors name the file, line and mergekit key.
"""

from __future__ import annotations

from typing import Any

from merge_cli.errors import RecipeError, did_you_mean
from merge_cli.recipe.yamlsrc import Loc, YamlSource, loc_str

TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name",
)  # fmt: skip
EXTENSION_KEYS = ("seed", "shard_size", "vocab", "donor")  # merge-cli keys also accepted in a mergekit recipe
MODEL_KEYS = (
    "model",
    "parameters",
    "lora",
    "pack",
)  # lora: as merge-cli's {model: BASE, lora: ADAPTER}; pack: SkillPacks
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
REF_KEYS = ("model", "lora", "pack", "override_architecture")  # pack: merge-cli's SkillPacks (issue 16)
FILTER_KEYS = ("filter", "value")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
UNSUPPORTED = ("modules", "residual_weight")  # accepted keys, never suggested
DROPPED = ("int8_mask",)  # only changes the dtype of mergekit's sign mask: no effect on the numbers
# methods whose base_model is a base (subtracted or interpolated from), not one more model to merge,
# although merge-cli may not require one
OPTIONAL_BASE = ("nuslerp", "multislerp")


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


class _Tr:
    def __init__(self, data: dict, src: YamlSource, doc: int):
        self.data, self.src, self.doc = data, src, doc
        self.aliases: list[tuple[Loc, Loc]] = []  # (native loc, mergekit loc) for error lines

    def where(self, loc: Loc) -> str:
        return self.src.where(loc, self.doc)

    def err(self, loc: Loc, msg: str) -> RecipeError:
        return RecipeError(f"{self.where(loc)}: {msg}")

    def keys(self, d: Any, allowed: tuple[str, ...], loc: Loc, what: str) -> dict:
        if not isinstance(d, dict):
            raise self.err(loc, f"{loc_str(loc)}: expected a mapping ({what}), got {type(d).__name__}")
        for k in d:
            if k not in allowed:
                raise self.err(
                    (*loc, k),
                    f"unknown key '{loc_str((*loc, k))}' in a mergekit recipe{did_you_mean(k, [a for a in allowed if a not in UNSUPPORTED])}",
                )
        return d

    # -- model references ------------------------------------------------------------------------
    def ref(self, value: Any, loc: Loc) -> str:
        """A mergekit model reference as a native one: `path[@rev]`, `base+adapter` (either part may carry
        `@rev`), or the dict form {model: str | {path, revision}, lora: str | {path, revision}}, which
        becomes `base+adapter` (io/refs.py applies the adapter as peft's merge_and_unload would)."""
        if isinstance(value, dict) and "path" in value and "model" not in value:
            return self.path(value, loc)  # a bare ModelPath
        if isinstance(value, dict):
            self.keys(value, REF_KEYS, loc, "a model reference")
            if "model" not in value:
                raise self.err(loc, f"missing required key '{loc_str((*loc, 'model'))}'")
            model = self.path(value["model"], (*loc, "model"))
            if value.get("pack") is not None:  # merge-cli's SkillPacks (issue 16): BASE+PACK.skillpack
                model = f"{model}+{self.path(value['pack'], (*loc, 'pack'))}"
            if value.get("lora") is None:
                return model
            return f"{model}+{self.path(value['lora'], (*loc, 'lora'))}"
        return self.path(value, loc)

    def path(self, value: Any, loc: Loc) -> str:
        """`str` or mergekit's ModelPath {path, revision} as `path[@revision]`."""
        if isinstance(value, dict):
            self.keys(value, ("path", "revision"), loc, "path and revision")
            if "path" not in value:
                raise self.err(loc, f"missing required key '{loc_str((*loc, 'path'))}'")
            rev = value.get("revision")
            return f"{value['path']}@{rev}" if rev else str(value["path"])
        if not isinstance(value, str) or not value:
            raise self.err(
                loc, f"{loc_str(loc)}: a model reference is a path or org/name[@revision] (got {value!r})"
            )
        return value

    # -- parameters ------------------------------------------------------------------------------
    def value(self, v: Any, loc: Loc) -> Any:
        if isinstance(v, list) and v and any(isinstance(e, dict) for e in v):
            out = []
            for i, e in enumerate(v):
                self.keys(e, FILTER_KEYS, (*loc, i), "{filter, value}")
                if "value" not in e:
                    raise self.err((*loc, i), f"missing required key '{loc_str((*loc, i, 'value'))}'")
                out.append({k: e[k] for k in FILTER_KEYS if k in e and not (k == "filter" and e[k] is None)})
            return out
        return v

    def params(self, d: Any, loc: Loc) -> dict:
        if d is None:
            return {}
        if not isinstance(d, dict):
            raise self.err(loc, f"{loc_str(loc)}: expected a mapping of parameters, got {type(d).__name__}")
        spec = self.spec
        out: dict[str, Any] = {}
        for k, v in d.items():
            v = self.value(v, (*loc, k))
            known = spec is not None and spec.params.field_of(k) is not None
            if not known and k in DROPPED:
                continue
            if not known and k == "normalize" and spec is not None and spec.params.field_of("merge_func"):
                out["merge_func"] = _map_values(v, lambda b: "mean" if b else "sum")
                self.aliases.append(((*loc, "merge_func"), (*loc, k)))
                continue
            out[k] = v
        return out

    # -- the recipe ------------------------------------------------------------------------------
    def run(self) -> dict:
        from merge_cli.methods import METHODS

        d = self.keys(self.data, TOP_KEYS + EXTENSION_KEYS, (), "a recipe")
        if "method" in d:
            raise self.err(
                ("method",), "give either `merge_method:` (mergekit) or `method:` (merge-cli), not both"
            )
        method = d["merge_method"]
        if not isinstance(method, str) or method not in METHODS:
            raise self.err(
                ("merge_method",),
                f"unknown merge method '{method}'{did_you_mean(method, METHODS)}; `merge-cli methods` lists them",
            )
        self.spec = METHODS[method]
        self.aliases.append((("method",), ("merge_method",)))
        if "modules" in d:
            raise self.err(
                ("modules",),
                "`modules:` (multi-module / vision-language recipes) is not supported; use models: or slices:",
            )
        if ("models" in d) == ("slices" in d):
            raise self.err((), "a mergekit recipe needs exactly one of `models:` or `slices:`")
        out: dict[str, Any] = {}
        if d.get("name") is not None:
            out["name"] = d["name"]
        out["method"] = method
        base = self.ref(d["base_model"], ("base_model",)) if d.get("base_model") is not None else None
        if base is not None:
            out["base_model"] = base
        if "models" in d:
            out["models"] = self.models(d["models"], base)
        else:
            out["slices"] = self.slices(d["slices"], base)
        params = self.params(d.get("parameters"), ("parameters",))
        if "models" in d:
            self.check_appended_base(out, params)
            if len(out["models"]) == 1:
                params = {**params, **self.lift_globals(out["models"][0])}
        params = self.with_defaults(params)
        if params:
            out["parameters"] = params
        if d.get("dtype") is not None:
            out["dtype"] = d["dtype"]
        if d.get("out_dtype") is not None or d.get("dtype") is not None:
            out["out_dtype"] = d.get("out_dtype") or d["dtype"]
        donor = self.tokenizer(d, out)
        if donor is not None:
            if d.get("donor") is not None:
                raise self.err(
                    ("donor",),
                    "give either `tokenizer_source:`/`tokenizer:` (mergekit) or `donor:`, not both",
                )
            out["donor"] = donor
        if d.get("chat_template") is not None:
            out["chat_template"] = d["chat_template"]
        for k in EXTENSION_KEYS:
            if k in d:
                out[k] = d[k]
        if "slices" in out:
            out["outer_tensors"] = "slices"
        return out

    def models(self, models: Any, base: str | None) -> list[dict]:
        if not isinstance(models, list) or not models:
            raise self.err(("models",), "`models:` must be a non-empty list of {model, parameters}")
        out = []
        for i, m in enumerate(models):
            if isinstance(m, str):
                m = {"model": m}
            self.keys(m, MODEL_KEYS, ("models", i), "{model, parameters}")
            if "model" not in m:
                raise self.err(("models", i), f"missing required key '{loc_str(('models', i, 'model'))}'")
            ref = m["model"] if m.get("lora") is None else {"model": m["model"], "lora": m["lora"]}
            e = {"model": self.ref(ref, ("models", i))}
            if (
                m.get("pack") is not None
            ):  # {model: BASE, pack: PACK.skillpack} = BASE+PACK.skillpack (issue 16)
                e["model"] = f"{e['model']}+{m['pack']}"
            ps = self.params(m.get("parameters"), ("models", i, "parameters"))
            if ps:
                e["parameters"] = ps
            out.append(e)
        spec = self.spec
        if base is not None and base not in [e["model"] for e in out]:
            if (
                not spec.needs_base
                and not getattr(spec, "optional_base", False)
                and spec.name not in OPTIONAL_BASE
            ):
                out.append({"model": base})  # mergekit merges the base like any other model here
        _unique_names(out)
        return out

    def check_appended_base(self, out: dict, params: dict) -> None:
        """mergekit appends the base to a linear-like merge and then requires its weight."""
        base = out.get("base_model")
        listed = [m["model"] for m in self.data["models"] if isinstance(m, dict)] + [
            m for m in self.data["models"] if isinstance(m, str)
        ]
        if base is None or base in listed or not any(m["model"] == base for m in out["models"]):
            return
        if self.spec.params.field_of("weight") is not None and "weight" not in params:
            raise self.err(
                ("base_model",),
                f"mergekit merges base_model '{base}' as one more model under {self.spec.name} and needs its weight; "
                "list it under models: with a weight, give a top-level parameters.weight, or drop base_model",
            )

    def slices(self, slices: Any, base: str | None) -> list[dict]:
        if not isinstance(slices, list) or not slices:
            raise self.err(("slices",), "`slices:` must be a non-empty list of {sources: [...]}")
        out = []
        for i, s in enumerate(slices):
            self.keys(s, SLICE_KEYS, ("slices", i), "{sources, parameters}")
            if (
                s.get("base_model") is not None
                and self.ref(s["base_model"], ("slices", i, "base_model")) != base
            ):
                raise self.err(
                    ("slices", i, "base_model"),
                    "a per-slice base_model different from the top-level one is not supported",
                )
            srcs = s.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise self.err(
                    ("slices", i),
                    f"missing required key '{loc_str(('slices', i, 'sources'))}' (a non-empty list)",
                )
            sources = []
            for j, src in enumerate(srcs):
                loc = ("slices", i, "sources", j)
                self.keys(src, SOURCE_KEYS, loc, "{model, layer_range, parameters}")
                for k in ("model", "layer_range"):
                    if k not in src:
                        raise self.err(loc, f"missing required key '{loc_str((*loc, k))}'")
                e = {"model": self.ref(src["model"], (*loc, "model")), "layers": src["layer_range"]}
                self.aliases.append(((*loc, "layers"), (*loc, "layer_range")))
                ps = self.params(src.get("parameters"), (*loc, "parameters"))
                if ps:
                    e["parameters"] = ps
                sources.append(e)
            sl: dict[str, Any] = {"sources": sources}
            ps = self.params(s.get("parameters"), ("slices", i, "parameters"))
            if len(sources) == 1:
                ps = {**ps, **self.lift_globals(sources[0])}
            if ps:
                sl["parameters"] = ps
            out.append(sl)
        return out

    def lift_globals(self, entry: dict) -> dict:
        """A lone model's parameters that merge-cli's method takes as global (passthrough `scale`, per model in
        mergekit) move up one level: with one model, per-model and global are the same thing."""
        ps = entry.get("parameters", {})
        per = self.spec.params.per_model_fields()
        lifted = {k: v for k, v in ps.items() if self.spec.params.field_of(k) not in (None, *per)}
        if lifted:
            entry["parameters"] = {k: v for k, v in ps.items() if k not in lifted}
            if not entry["parameters"]:
                del entry["parameters"]
        return lifted

    def with_defaults(self, params: dict) -> dict:
        """mergekit's defaults for this method as the lowest-precedence (top-level) values."""
        spec = self.spec
        for k, dv in (spec.mergekit_defaults or {}).items():
            f = spec.params.field_of(k)
            key = spec.params.key_of(f) if f else k
            if key not in params:
                params[key] = dv
            elif isinstance(params[key], list) and params[key] and isinstance(params[key][0], dict):
                if not any(e.get("filter") in (None, "*") for e in params[key]):
                    params[key] = [*params[key], {"value": dv}]
        return params

    def tokenizer(self, d: dict, out: dict) -> str | None:
        if d.get("tokenizer_source") is not None and d.get("tokenizer") is not None:
            raise self.err(("tokenizer",), "give either `tokenizer_source:` or `tokenizer:`, not both")
        loc: Loc = ("tokenizer_source",)
        source = d.get("tokenizer_source")
        if d.get("tokenizer") is not None:
            tok = self.keys(
                d["tokenizer"], TOKENIZER_KEYS, ("tokenizer",), "{source, tokens, pad_to_multiple_of}"
            )
            for k in ("tokens", "pad_to_multiple_of"):
                if tok.get(k):
                    raise self.err(
                        ("tokenizer", k),
                        f"tokenizer.{k} is not supported (merge-cli merges models sharing one vocabulary)",
                    )
            loc, source = ("tokenizer", "source"), tok.get("source")
        if source is None:
            return None
        self.aliases.append((("donor",), loc))
        if source in ("base", "union"):
            # union over one shared vocabulary is the base's tokenizer; differing vocabularies fail at plan time
            return "base"
        ref = self.ref(source, loc)
        listed = (
            [m["model"] for m in out.get("models", [])]
            + [src["model"] for s in out.get("slices", []) for src in s["sources"]]
            + [out.get("base_model")]
        )
        if ref not in listed:
            raise self.err(loc, f"tokenizer source '{ref}' is not base, union or a model of the recipe")
        return ref


def _map_values(v: Any, fn) -> Any:
    if isinstance(v, list):
        return [({**e, "value": _map_values(e["value"], fn)} if isinstance(e, dict) else fn(e)) for e in v]
    return fn(v)


def _unique_names(entries: list[dict]) -> None:
    """Give entries whose folder names collide a distinct `name:` (native labels must be unique)."""
    from pathlib import Path

    labels = [Path(e["model"].split("@")[0].rstrip("/")).name or e["model"] for e in entries]
    for i, e in enumerate(entries):
        if labels.count(labels[i]) > 1:
            e["name"] = f"{labels[i]}_{i}"


def translate(data: dict, src: YamlSource, doc: int = 0) -> dict:
    """A mergekit-format recipe (one YAML document) -> the equivalent native recipe dict."""
    tr = _Tr(data, src, doc)
    out = tr.run()
    if doc < len(src.lines):
        lines = src.lines[doc]
        for native, mk in tr.aliases:
            for loc, line in list(lines.items()):
                if loc[: len(mk)] == mk and native + loc[len(mk) :] not in lines:
                    lines[native + loc[len(mk) :]] = line
    return out


def to_native_yaml(native: dict) -> str:
    import yaml

    return yaml.safe_dump(native, sort_keys=False, default_flow_style=None, width=110)
