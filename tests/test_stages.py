"""Multi-stage recipes: dependency order, names as model references, reuse of unchanged stages, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import load_output, run_cli, write_recipe

from merge_cli.errors import RecipeError
from merge_cli.recipe.stages import load_stages


def recipe_text(family, soup_weight: float = 1.0, final_weight: float = 0.5) -> str:
    # the final (unnamed) document comes first: order in the file does not matter, dependencies do
    return f"""
method: task_arithmetic
base_model: {family["base"]}
models:
  - model: soup
  - model: {family["expert2"]}
    parameters: {{weight: {final_weight}}}
---
name: soup
merge_method: linear
models:
  - model: {family["expert0"]}
    parameters: {{weight: {soup_weight}}}
  - model: {family["expert1"]}
    parameters: {{weight: 1.0}}
"""


def run(recipe, out, inter, *extra):
    res = run_cli("run", recipe, out, "--intermediate-dir", inter, "-q", "--device", "cpu", *extra)
    assert res.exit_code == 0, res.stderr
    return res.stdout


def test_multi_stage_runs_in_order_and_reuses_unchanged_stages(tmp_path, family):
    recipe = write_recipe(tmp_path / "multi.yaml", recipe_text(family))
    out, inter = tmp_path / "out", tmp_path / "inter"
    log = run(recipe, out, inter)
    assert "stage 'soup': merging" in log
    soup_file = inter / "soup" / "model.safetensors"
    base, e = load_output(family["base"]), [load_output(family[f"expert{k}"]) for k in range(3)]
    merged = load_output(out)
    name = "model.layers.1.mlp.up_proj.weight"
    soup = (e[0][name] + e[1][name]) / 2
    expect = base[name] + (soup - base[name]) + 0.5 * (e[2][name] - base[name])
    torch.testing.assert_close(merged[name], expect, rtol=0, atol=1e-6)

    mtime = soup_file.stat().st_mtime_ns
    log = run(recipe, out, inter, "--overwrite")
    assert "stage 'soup': unchanged, reusing" in log
    assert soup_file.stat().st_mtime_ns == mtime  # not recomputed

    write_recipe(recipe, recipe_text(family, final_weight=0.25))  # only the final stage changes
    log = run(recipe, out, inter, "--overwrite")
    assert "unchanged, reusing" in log and soup_file.stat().st_mtime_ns == mtime
    torch.testing.assert_close(
        load_output(out)[name],
        base[name] + (soup - base[name]) + 0.25 * (e[2][name] - base[name]),
        rtol=0,
        atol=1e-6,
    )

    write_recipe(recipe, recipe_text(family, soup_weight=3.0))  # the stage itself changes
    log = run(recipe, out, inter, "--overwrite")
    assert "stage 'soup': merging" in log
    soup3 = (3 * e[0][name] + e[1][name]) / 4
    torch.testing.assert_close(load_output(inter / "soup")[name], soup3, rtol=0, atol=1e-6)


def test_stage_chain_recomputes_downstream(tmp_path, family):
    text = f"""
name: a
merge_method: linear
models: [{{model: {family["expert0"]}, parameters: {{weight: 1.0}}}}, {{model: {family["expert1"]}, parameters: {{weight: 1.0}}}}]
---
name: b
merge_method: linear
models: [{{model: a, parameters: {{weight: 1.0}}}}, {{model: {family["expert2"]}, parameters: {{weight: 1.0}}}}]
---
merge_method: passthrough
models: [{{model: b}}]
"""
    recipe = write_recipe(tmp_path / "chain.yaml", text)
    out, inter = tmp_path / "out", tmp_path / "inter"
    run(recipe, out, inter)
    b_mtime = (inter / "b" / "model.safetensors").stat().st_mtime_ns
    (inter / "a" / "manifest.json").write_text("{}")  # a's output changed: b (which reads it) is recomputed
    log = run(recipe, out, inter, "--overwrite")
    assert "stage 'a': unchanged, reusing" in log and "stage 'b': merging" in log
    assert (inter / "b" / "model.safetensors").stat().st_mtime_ns != b_mtime
    log = run(recipe, out, inter, "--overwrite")
    assert log.count("unchanged, reusing") == 2


@pytest.mark.parametrize(
    "text, expect",
    [
        ("method: linear\nmodels: [a]\n---\nmethod: linear\nmodels: [b]\n", "exactly one document without `name:`"),
        ("name: x\nmethod: linear\nmodels: [y]\n---\nname: y\nmethod: linear\nmodels: [x]\n---\nmethod: linear\nmodels: [x]\n",
         "cycle"),
        ("name: x\nmethod: linear\nmodels: [a]\n---\nmethod: linear\nmodels: [x]\nparamters: {}\n", "multi.yaml:7: unknown key"),
    ],
)  # fmt: skip
def test_multi_stage_errors(tmp_path, text, expect):
    path = write_recipe(tmp_path / "multi.yaml", text)
    with pytest.raises(RecipeError, match=expect):
        load_stages(path)
    res = run_cli("validate", path)
    assert res.exit_code == 2 and "Traceback" not in res.stderr


def test_convert_multi_stage(tmp_path, family):
    recipe = write_recipe(tmp_path / "multi.yaml", recipe_text(family))
    res = run_cli("convert", recipe)
    assert res.exit_code == 0, res.stderr
    native = write_recipe(tmp_path / "native.yaml", res.stdout)
    assert res.stdout.count("---") == 1 and "merge_method" not in res.stdout
    _, stages, _ = load_stages(native)
    assert [s.name for s in stages] == ["soup", None]
