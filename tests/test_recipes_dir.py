"""Every recipe in recipes/ validates, and every registered method has an example recipe."""

from pathlib import Path

import pytest

from merge_cli.methods import METHODS
from merge_cli.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method in METHODS


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_an_example_recipe(method):
    assert any(load_recipe(p).method == method for p in RECIPES), f"add recipes/{method}.yaml"
