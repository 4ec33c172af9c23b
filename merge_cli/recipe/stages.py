"""Multi-stage recipes: several YAML documents in one file, run in dependency order.

Every document but one has a `name:`; later documents use those names as model references (base_model,
models, slice sources, donor/tokenizer source). The unnamed document is the final merge, written to the
output folder; each named stage is written to `<intermediate dir>/<name>/` and reused on the next run when
its key is unchanged. The key is a sha256 over the stage's document (as parsed, so comments and layout do
not count), the options that change the output (seed, shard size), and the identity of every input: the
manifest.json of a merge-cli output (an earlier stage), else the names, sizes and mtimes of the folder's
files. A stage whose input stage was recomputed is therefore recomputed too.

Documents may be native or mergekit-format (mergekit-multi's layout), in any order without cycles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_cli.errors import RecipeError
from merge_cli.recipe.load import parse_recipe
from merge_cli.recipe.schema import Recipe
from merge_cli.recipe.yamlsrc import YamlSource


@dataclass
class Stage:
    name: str | None  # None: the final merge
    doc: int
    data: dict
    needs: list[str]


def _refs(data: dict) -> list[tuple[Any, Any]]:
    """(container, key) of every model reference of a recipe document, native or mergekit."""
    out: list[tuple[Any, Any]] = []
    for k in ("base_model", "donor", "tokenizer_source"):
        if isinstance(data.get(k), str):
            out.append((data, k))
    if isinstance(data.get("tokenizer"), dict) and isinstance(data["tokenizer"].get("source"), str):
        out.append((data["tokenizer"], "source"))
    for i, m in enumerate(data.get("models") or []):
        if isinstance(m, str):
            out.append((data["models"], i))
        elif isinstance(m, dict) and isinstance(m.get("model"), str):
            out.append((m, "model"))
    for s in data.get("slices") or []:
        for src in (s.get("sources") or []) if isinstance(s, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                out.append((src, "model"))
    return out


def split_stages(src: YamlSource) -> list[Stage]:
    """The documents of a multi-stage file in an order where every stage follows the stages it uses."""
    stages: list[Stage] = []
    for i, data in enumerate(src.documents):
        if data is None:
            continue
        if not isinstance(data, dict):
            raise RecipeError(f"{src.name}: document {i + 1} is not a mapping of keys")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise RecipeError(f"{src.where(('name',), i)}: a stage name is a string")
        stages.append(Stage(name, i, data, []))
    names = [s.name for s in stages if s.name is not None]
    finals = [s for s in stages if s.name is None]
    if len(finals) != 1:
        where = src.where((), finals[1].doc) if len(finals) > 1 else src.name
        raise RecipeError(
            f"{where}: a multi-stage recipe needs exactly one document without `name:` (the final merge); found {len(finals)}"
        )
    for s in stages:
        if s.name is not None and names.count(s.name) > 1:
            raise RecipeError(f"{src.where(('name',), s.doc)}: two stages are named '{s.name}'")
        s.needs = sorted({c[k] for c, k in _refs(s.data) if c[k] in names and c[k] != s.name})
    order: list[Stage] = []
    done: set[str] = set()
    pending = list(stages)
    while pending:
        ready = [s for s in pending if all(n in done for n in s.needs)]
        if not ready:
            s = pending[0]
            raise RecipeError(
                f"{src.where(('name',), s.doc)}: stages {', '.join(repr(p.name) for p in pending)} use each other in a cycle"
            )
        for s in ready:
            order.append(s)
            pending.remove(s)
            if s.name:
                done.add(s.name)
    return order


def stage_recipe(
    stage: Stage, src: YamlSource, path: Path, paths: dict[str, Path], overrides: dict | None
) -> Recipe:
    """The stage's Recipe with earlier stages' names replaced by their output folders."""
    data = json.loads(json.dumps(stage.data))  # a deep copy
    for c, k in _refs(data):
        if c[k] in paths:
            c[k] = str(paths[c[k]])
    if overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_recipe(data, src, path.resolve(), stage.doc)


def load_stages(path: Path, overrides: dict | None = None, intermediate_dir: Path | None = None):
    """Validate every stage up front (no model opened). Returns (source, ordered stages, stage name -> folder)."""
    path = Path(path)
    src = YamlSource.from_file(path)
    stages = split_stages(src)
    inter = Path(intermediate_dir) if intermediate_dir else Path("intermediate")
    paths = {s.name: inter / s.name for s in stages if s.name}
    for s in stages:
        stage_recipe(s, src, path, paths, overrides)
    return src, stages, paths


def is_multi_stage(path: Path) -> bool:
    try:
        return sum(d is not None for d in YamlSource.from_file(Path(path)).documents) > 1
    except RecipeError:
        return False
