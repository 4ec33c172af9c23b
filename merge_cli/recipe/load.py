"""Reading a recipe file: YAML with line numbers, mergekit format translated, then validated (schema.py).
The one place that knows both formats, so neither schema.py nor mergekit.py imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from merge_cli.errors import RecipeError, did_you_mean
from merge_cli.recipe import mergekit
from merge_cli.recipe.schema import Recipe, _one_line, _semantic_checks
from merge_cli.recipe.yamlsrc import YamlSource


def parse_recipe(data: Any, source: YamlSource, path: Path | None = None, doc: int = 0) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source.name}: a recipe must be a YAML mapping of keys (got {type(data).__name__})"
        )
    if mergekit.is_mergekit(data):
        data = mergekit.translate(data, source, doc)
    elif "method" not in data:
        for key in data:  # a misspelt merge_method: say so rather than "missing key 'method'"
            hint = did_you_mean(key, ["merge_method"])
            if hint:
                raise RecipeError(f"{source.where((key,), doc)}: unknown key '{key}'{hint}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise _one_line(err, source, doc) from None
    recipe._path = path
    recipe._source = source
    recipe._doc = doc
    _semantic_checks(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, validate and check a recipe file. `overrides` replace top-level keys (from the CLI)."""
    path = Path(path)
    src = YamlSource.from_file(path)
    docs = [d for d in src.documents if d is not None]
    if not docs:
        raise RecipeError(f"{path}: the recipe is empty")
    if len(docs) > 1:
        raise RecipeError(
            f"{path}: holds {len(docs)} YAML documents (a multi-stage recipe): `merge-cli run`, `validate` and "
            "`convert` take it; plan one stage at a time"
        )
    data = dict(docs[0]) if isinstance(docs[0], dict) else docs[0]
    if isinstance(data, dict) and data.get("kind") == "logit_fusion":
        raise RecipeError(
            f"{path}: a logit_fusion recipe fuses at decoding time; run `merge-cli generate --recipe {path}`"
        )
    if overrides and isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_recipe(data, src, path.resolve())


def convert_file(path) -> str:
    """Every document of a recipe file as native YAML (documents already native are checked and kept)."""
    path = Path(path)
    src = YamlSource.from_file(path)
    docs = [(i, d) for i, d in enumerate(src.documents) if d is not None]
    if not docs:
        raise RecipeError(f"{path}: the recipe is empty")
    texts = []
    for i, data in docs:
        native = mergekit.translate(data, src, i) if mergekit.is_mergekit(data) else data
        parse_recipe(native, src, path.resolve(), i)
        texts.append(mergekit.to_native_yaml(native))
    return "---\n".join(texts)
