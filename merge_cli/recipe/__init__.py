"""The recipe stage: YAML -> a validated Recipe (pydantic), before any model is opened.

- load.py: load_recipe / parse_recipe / convert_file: a file in either format to a validated Recipe.
- schema.py: the native recipe's pydantic models, semantic checks, sizes.
- mergekit.py: mergekit-format recipes translated to the native schema (`merge-cli convert`).
- stages.py: multi-stage recipes split into one Recipe per stage (running them: merge_cli/merge/stages.py).
- params.py: parameter values resolved per tensor (layer gradients, precedence) for the plan.
- yamlsrc.py: YAML with line numbers, for one-line errors that name the line.
"""

from merge_cli.recipe.load import convert_file, load_recipe, parse_recipe
from merge_cli.recipe.schema import (
    FilterEntry,
    ModelEntry,
    Override,
    Recipe,
    Slice,
    SliceSource,
    match_tensor,
    parse_size,
    sources_for,
)

__all__ = [
    "FilterEntry",
    "ModelEntry",
    "Override",
    "Recipe",
    "Slice",
    "SliceSource",
    "convert_file",
    "load_recipe",
    "match_tensor",
    "parse_recipe",
    "parse_size",
    "sources_for",
]
