"""Every registered method: an example recipe that validates, docs with its paper, sane metadata; end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import load_output, run_cli, write_recipe
from method_helpers import t

from merge_cli.methods import METHODS
from merge_cli.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_example_recipe_validates(name):
    path = RECIPES / f"{name}.yaml"
    assert path.exists(), f"recipes/{name}.yaml is missing"
    assert path.read_text().lstrip().startswith("#"), "the example starts with a comment explaining it"
    r = load_recipe(path)
    assert r.method == name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_command_prints_the_paper(name):
    spec = METHODS[name]
    res = run_cli("methods", name)
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert " ".join(spec.paper.split()) in text
    assert " ".join(spec.summary.split()) in text  # printed verbatim (brackets are not rich markup)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_spec_metadata(name):
    spec = METHODS[name]
    assert spec.title and spec.summary and spec.paper
    assert spec.mergekit_defaults is not None
    keys = set(spec.params.recipe_keys())
    assert set(spec.mergekit_defaults) <= keys
    values = dict(spec.mergekit_defaults)
    for fname, f in spec.params.model_fields.items():
        if f.is_required():
            values.setdefault(spec.params.key_of(fname), 0.5)
    spec.params.model_validate(values)  # mergekit's values are in range
    for fname, f in spec.params.model_fields.items():
        assert f.description, f"{name}.{fname} needs a description"
    assert spec.random == name.startswith(("dare", "della"))


def _recipe(tmp_path, family, method, models, seed=0, **params):
    return write_recipe(
        tmp_path / f"{method}-{seed}.yaml",
        {"base_model": str(family["base"]), "models": [{"model": str(family[m])} for m in models],
         "method": method, "parameters": params, "seed": seed, "dtype": "float32", "out_dtype": "float32"},
    )  # fmt: skip


def test_random_methods_reproducible_end_to_end(family, tmp_path):
    outs = {}
    for key, seed in (("a", 1), ("b", 1), ("c", 2)):
        r = _recipe(tmp_path, family, "della", ["expert0", "expert1"], seed=seed, density=0.5, epsilon=0.1)
        res = run_cli("run", r, tmp_path / f"out-{key}", "--quiet", "--device", "cpu")
        assert res.exit_code == 0, res.stderr
        outs[key] = load_output(tmp_path / f"out-{key}")
    name = next(n for n in outs["a"] if n.endswith("q_proj.weight"))
    assert all(torch.equal(outs["a"][n], outs["b"][n]) for n in outs["a"])
    assert not torch.equal(outs["a"][name], outs["c"][name])


def test_nuslerp_with_a_base_interpolates_task_vectors(family, tmp_path):
    from safetensors.torch import load_file

    def read(m):
        sd = {}
        for f in sorted(Path(family[m]).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    r = _recipe(tmp_path, family, "nuslerp", ["expert0", "expert1"])
    res = run_cli("run", r, tmp_path / "out", "--quiet", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    out, base, a, b = load_output(tmp_path / "out"), read("base"), read("expert0"), read("expert1")
    name = next(n for n in out if n.endswith("v_proj.weight"))
    x = (a[name] - base[name]).reshape(-1).tolist()
    y = (b[name] - base[name]).reshape(-1).tolist()
    nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    om = math.acos(sum(p * q for p, q in zip(x, y, strict=True)) / (nx * ny))
    c = math.sin(0.5 * om) / math.sin(om)
    want = base[name] + torch.tensor([c * (p + q) for p, q in zip(x, y, strict=True)]).reshape(
        base[name].shape
    )
    torch.testing.assert_close(out[name], want, atol=1e-6, rtol=1e-5)


def test_slerp_needs_exactly_one_other_model(family, tmp_path):
    res = run_cli("validate", _recipe(tmp_path, family, "slerp", ["expert0", "expert1"]))
    assert res.exit_code == 2 and "slerp" in res.stderr


def test_helpers_tensor_builder():
    assert t([1.0, 2.0]).shape == (2,)


NEW = [
    "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp",
    "nuslerp", "multislerp", "karcher", "sce", "nearswap", "ram", "ramplus_tl", "arcee_fusion",
]  # fmt: skip


@pytest.mark.parametrize("name", NEW)
def test_every_new_method_runs_end_to_end(name, family, tmp_path):
    spec = METHODS[name]
    n = max(spec.min_models, min(spec.max_models or 3, 3))
    experts = [f"expert{i}" for i in range(n)]
    params = {"t": 0.01} if name == "nearswap" else {}
    recipe = {"models": [{"model": str(family[m])} for m in experts], "method": name, "parameters": params,
              "out_dtype": "bfloat16"}  # fmt: skip
    if spec.needs_base or spec.optional_base:
        recipe["base_model"] = str(family["base"])
    res = run_cli(
        "run", write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", "--quiet", "--device", "cpu"
    )
    assert res.exit_code == 0, res.stderr
    out = load_output(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(next(Path(family["base"]).glob("*.safetensors"))), "pt") as f:
        assert set(out) == set(f.keys())
        for key in f.keys():
            assert list(out[key].shape) == f.get_slice(key).get_shape()
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in out.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_can_merge_in_row_chunks(name):
    spec = METHODS[name]
    assert spec.elementwise or spec.streamed is not None
