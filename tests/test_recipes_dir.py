"""Every recipe in recipes/ validates, and every registered method has an example recipe."""

from pathlib import Path

import pytest

from merge_cli.fusion.spec import is_fusion_recipe, load_fusion_spec
from merge_cli.methods import METHODS
from merge_cli.recipe import load_recipe
from merge_cli.skillpack.twin import is_twin_recipe, load_twin_recipe

ALL = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
FUSION = [p for p in ALL if is_fusion_recipe(p)]  # kind: logit_fusion (merge-cli generate), not merges
TWIN = [p for p in ALL if is_twin_recipe(p)]  # method: twin (shared model + packs, skillpack/twin.py)
RECIPES = [p for p in ALL if p not in FUSION and p not in TWIN]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.method in METHODS


@pytest.mark.parametrize("path", FUSION, ids=lambda p: p.name)
def test_logit_fusion_recipe_validates(path):
    spec = load_fusion_spec(path)
    assert spec.kind == "logit_fusion" and spec.expert_list()


@pytest.mark.parametrize("path", TWIN, ids=lambda p: p.name)
def test_twin_recipe_validates(path):
    t = load_twin_recipe(path)
    assert t["method"] in METHODS and len(t["experts"]) >= 1 and 0.0 <= t["density"] <= 1.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_an_example_recipe(method):
    assert any(load_recipe(p).method == method for p in RECIPES), f"add recipes/{method}.yaml"
