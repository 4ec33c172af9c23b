"""Issue 15: every syntax the docs say is accepted is accepted in both recipe formats, and means the same.

Each form is written once as a native recipe (`method:`) and once as a mergekit recipe (`merge_method:`);
both must load (no model is opened) and agree on what the form sets. Forms from docs/recipes.md (the
top-level keys that apply to both), docs/huggingface.md (model references) and docs/mergekit-compat.md.
"""

from __future__ import annotations

import pytest
from helpers import write_recipe

from merge_cli.recipe import load_recipe

M = "./models/a"  # references are only parsed here: no model is opened


def both(method: str, models: list, **top) -> tuple[dict, dict]:
    """The same recipe in the native and in the mergekit format."""
    native = {"method": method, "models": models, **top}
    mk = {"merge_method": method, "models": [m if isinstance(m, (str, dict)) else m for m in models], **top}
    return native, mk


def refs(r) -> list[str]:
    return [m.model for m in r.models]


# form id -> (native recipe, mergekit recipe, what both must give)
FORMS = {
    # docs/huggingface.md: model references
    "local path shorthand": (*both("linear", [M, "./models/b"]), lambda r: refs(r) == [M, "./models/b"]),
    "single safetensors file": (*both("linear", ["./one.safetensors", M]), lambda r: refs(r)[0] == "./one.safetensors"),
    "hub id": (*both("linear", ["org/name", M]), lambda r: refs(r)[0] == "org/name"),
    "hub id at revision": (*both("linear", ["org/name@v1.0", M]), lambda r: refs(r)[0] == "org/name@v1.0"),
    "base+adapter": (*both("linear", [f"org/base+{M}"]), lambda r: refs(r) == [f"org/base+{M}"]),
    "base and lora keys": (
        *both("linear", [{"model": "org/base", "lora": "./adapter"}]),
        lambda r: refs(r) == ["org/base+./adapter"],
    ),
    "path and revision mapping": (
        *both("linear", [{"model": {"path": "org/name", "revision": "abc"}}, M]),
        lambda r: refs(r)[0] == "org/name@abc",
    ),
    "base_model as path and revision mapping": (
        *both("task_arithmetic", [M], base_model={"path": "org/base", "revision": "v2"}),
        lambda r: r.base_model == "org/base@v2",
    ),
    # docs/recipes.md: top-level keys
    "name": (*both("linear", [M], name="My merge"), lambda r: r.name == "My merge"),
    "dtype and out_dtype": (
        *both("linear", [M], dtype="bfloat16", out_dtype="float16"),
        lambda r: (r.dtype, r.out_dtype) == ("bfloat16", "float16"),
    ),
    "seed": (*both("dare_linear", [M], base_model="./base", seed=7), lambda r: r.seed == 7),
    "shard_size GB": (*both("linear", [M], shard_size="5GB"), lambda r: r.shard_bytes() == 5 * 10**9),
    "shard_size MB": (*both("linear", [M], shard_size="500MB"), lambda r: r.shard_bytes() == 500 * 10**6),
    "shard_size GiB": (*both("linear", [M], shard_size="2GiB"), lambda r: r.shard_bytes() == 2 << 30),
    "shard_size bytes": (*both("linear", [M], shard_size=123456), lambda r: r.shard_bytes() == 123456),
    "donor base": (*both("linear", [M], donor="base"), lambda r: r.donor == "base"),
    "vocab pad_from_base": (
        *both("task_arithmetic", [M], base_model="./base", vocab="pad_from_base"),
        lambda r: r.vocab == "pad_from_base",
    ),
    "vocab crop": (*both("linear", [M], vocab="crop"), lambda r: r.vocab == "crop"),
    "chat_template built-in": (*both("linear", [M], chat_template="chatml"), lambda r: r.chat_template == "chatml"),
    "chat_template jinja text": (
        *both("linear", [M], chat_template="{{ messages }}"),
        lambda r: r.chat_template == "{{ messages }}",
    ),
    # parameters: scalars, gradients, filter lists (docs/recipes.md, docs/mergekit-compat.md)
    "gradient list": (
        *both("ties", [{"model": M, "parameters": {"density": [0.2, 0.5, 0.8]}}], base_model="./base"),
        lambda r: r.models[0].parameters["density"] == [0.2, 0.5, 0.8],
    ),
    "filter list": (
        *both("ties", [{"model": M, "parameters": {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}}], base_model="./base"),
        lambda r: r.models[0].parameters["density"][0].filter == "mlp",
    ),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["native", "mergekit"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_documented_form_is_accepted_in_both_formats(tmp_path, form, fmt):
    native, mk, check = FORMS[form]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", native if fmt == "native" else mk))
    assert check(recipe), (form, fmt)


@pytest.mark.parametrize("fmt", ["native", "mergekit"])
def test_slices_with_layer_range(tmp_path, fmt):
    """docs/recipes.md slices, with mergekit's `layer_range` (accepted natively too) and native `layers`."""
    key = "method" if fmt == "native" else "merge_method"
    data = {
        key: "passthrough",
        "slices": [
            {"sources": [{"model": M, "layer_range": [0, 2]}]},
            {"sources": [{"model": {"path": "org/b", "revision": "r1"}, "layer_range": [1, 3]}]},
        ],
    }
    r = load_recipe(write_recipe(tmp_path / "r.yaml", data))
    assert [(s.sources[0].model, tuple(s.sources[0].layers)) for s in r.slices] == [
        (M, (0, 2)),
        ("org/b@r1", (1, 3)),
    ]


def test_donor_and_tokenizer_source_together_are_refused(tmp_path):
    from merge_cli.errors import RecipeError

    path = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [M], "donor": "base", "tokenizer_source": "base"},
    )
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(path)
