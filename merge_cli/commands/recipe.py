"""Commands that stop before any weight is read: validate, plan, convert."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import ALLOW_PICKLE_HELP, handle_errors, load_recipe_arg, out, size_arg


@handle_errors
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")):
    """Check a recipe without opening any model: keys, methods, parameter names and ranges."""
    from merge_cli.recipe.stages import is_multi_stage, load_stages

    if is_multi_stage(recipe):
        _, stages, _ = load_stages(recipe)
        print(f"ok: {recipe} is a valid multi-stage recipe: {', '.join(s.name or 'final' for s in stages)}")
        return
    from merge_cli.skillpack.twin import is_twin_recipe, load_twin_recipe

    if is_twin_recipe(recipe):
        t = load_twin_recipe(recipe)
        print(
            f"ok: {recipe} is a valid twin recipe: a shared {t['method']} merge and {len(t['experts'])} exclusive pack(s)"
        )
        return
    r = load_recipe_arg(recipe)
    n = len(r.models) or sum(len(s.sources) for s in r.slices)
    print(f"ok: {recipe} is a valid {r.method} recipe over {n} model reference(s)")


@handle_errors
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the whole plan, one entry per tensor, as JSON."
    ),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
    shard_size: Optional[str] = typer.Option(
        None, help="Output shard size, e.g. 5GB or 500MB (overrides the recipe)."
    ),
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Plan a merge from safetensors headers alone (no weight is read) and print a summary."""
    from merge_cli.commands.render import print_plan
    from merge_cli.plan import build_plan

    p = build_plan(
        load_recipe_arg(recipe),
        allow_arch_mismatch=allow_arch_mismatch,
        shard_size=size_arg(shard_size),
        allow_pickle=allow_pickle,
    )
    try:
        if as_json:
            print(json.dumps(p.to_json(), indent=1))
        else:
            print_plan(p, out)
    finally:
        p.close()


@handle_errors
def convert(
    recipe: Path = typer.Argument(..., help="A mergekit recipe YAML file (several documents: multi-stage)."),
):
    """Print the equivalent native merge-cli recipe of a mergekit recipe (checked, but no model is opened)."""
    from merge_cli.recipe import convert_file

    sys.stdout.write(convert_file(recipe))
