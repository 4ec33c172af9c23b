"""mergekit-format recipes: precedence, filters, gradients, t within slices, base handling, convert, errors.

Expected parameter values are worked out by hand from the rules in docs/mergekit-compat.md (MERGEKIT.md §2):
t = i/(L-1) within a slice (1 for a one-layer slice, 0 outside the layer stack); a gradient [a, b] at t is
a + (b - a) t; filter lists pick the first entry whose filter is a substring of the name and fall through to
the next level (slice-source -> slice -> top level) when none matches; per-model values match the model's
INPUT tensor name, global ones the OUTPUT name.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_recipe

from merge_cli.errors import PlanError, RecipeError
from merge_cli.methods.task_arithmetic import weighted_sum
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe


def plan_jobs(path):
    p = build_plan(load_recipe(path))
    try:
        return p, {j["name"]: j for j in p.to_json()["jobs"]}
    finally:
        p.close()


def approx(values):
    return pytest.approx(values, abs=1e-9)


def ties_recipe(tmp_path, family):
    return write_recipe(
        tmp_path / "ties.yaml",
        f"""
merge_method: ties
base_model: {family["base"]}
models:
  - model: {family["expert0"]}
    parameters: {{weight: [{{filter: mlp, value: 0.7}}], density: [1.0, 0.4]}}
  - model: {family["expert1"]}
    parameters: {{density: 0.5}}
  - model: {family["expert2"]}
    parameters: {{weight: 0.25}}
parameters:
  weight: [{{filter: self_attn, value: 0.3}}, {{value: 0.1}}]
  normalize: false
  int8_mask: true
""",
    )


def test_models_recipe_gradients_filters_precedence_and_mergekit_defaults(tmp_path, family):
    plan, jobs = plan_jobs(ties_recipe(tmp_path, family))
    assert [m["label"] for m in plan.to_json()["models"]][0] == "base"
    up1 = jobs["model.layers.1.mlp.up_proj.weight"]
    assert [i["model"] for i in up1["inputs"]] == [
        "expert0",
        "expert1",
        "expert2",
    ]  # the base is not a source
    assert up1["t"] == pytest.approx(1 / 3)
    # expert0: its own mlp filter; expert1: top-level catch-all; expert2: its own scalar
    assert up1["params"]["weight"] == approx([0.7, 0.1, 0.25])
    # expert0: 1.0 + (0.4 - 1.0) / 3 = 0.8; expert2 sets no density anywhere -> mergekit's default 1.0
    assert up1["params"]["density"] == approx([0.8, 0.5, 1.0])
    assert up1["params"]["merge_func"] == "sum"  # normalize: false
    assert up1["params"]["weighted_election"] is True  # mergekit elects on weighted deltas
    q2 = jobs["model.layers.2.self_attn.q_proj.weight"]
    # expert0's filter list has no match -> falls through to the top level's self_attn entry
    assert q2["params"]["weight"] == approx([0.3, 0.3, 0.25])
    assert q2["params"]["density"] == approx([1.0 - 0.6 * 2 / 3, 0.5, 1.0])
    assert jobs["model.layers.3.mlp.down_proj.weight"]["params"]["density"] == approx([0.4, 0.5, 1.0])
    for outer in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert jobs[outer]["t"] == 0.0
        assert jobs[outer]["params"]["density"] == approx([1.0, 0.5, 1.0])
    assert jobs["model.norm.weight"]["params"]["weight"] == approx([0.1, 0.1, 0.25])


def slices_recipe(tmp_path, family):
    e0, e1 = family["expert0"], family["expert1"]
    return write_recipe(
        tmp_path / "slices.yaml",
        f"""
merge_method: linear
slices:
  - sources:
      - {{model: {e0}, layer_range: [2, 4], parameters: {{weight: [{{filter: layers.2., value: 5.0}}]}}}}
      - {{model: {e1}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}
  - sources:
      - {{model: {e0}, layer_range: [0, 3]}}
      - {{model: {e1}, layer_range: [1, 4], parameters: {{weight: [0.0, 1.0]}}}}
    parameters: {{weight: 3.0}}
  - sources:
      - {{model: {e0}, layer_range: [3, 4]}}
      - {{model: {e1}, layer_range: [3, 4], parameters: {{weight: [0.0, 1.0]}}}}
parameters:
  weight: [{{filter: layers.1., value: 7.0}}, {{value: 2.0}}]
  normalize: [{{filter: layers.0., value: false}}, {{value: true}}]
""",
    )


def test_slices_t_input_vs_output_names_and_outer_tensors(tmp_path, family):
    plan, jobs = plan_jobs(slices_recipe(tmp_path, family))
    assert plan.num_layers == 2 + 3 + 1
    l0 = jobs["model.layers.0.mlp.up_proj.weight"]
    assert [(i["model"], i["name"]) for i in l0["inputs"]] == [
        ("expert0", "model.layers.2.mlp.up_proj.weight"),
        ("expert1", "model.layers.0.mlp.up_proj.weight"),
    ]
    assert l0["t"] == 0.0
    assert l0["params"]["weight"] == approx([5.0, 1.0])  # expert0's filter matches its INPUT name (layer 2)
    assert l0["params"]["normalize"] is False  # global: matched on the OUTPUT name (layer 0)
    l1 = jobs["model.layers.1.mlp.up_proj.weight"]
    assert l1["t"] == 1.0
    # expert0 reads layer 3: its filter misses, the top level's 'layers.1.' entry misses its input name too
    assert l1["params"]["weight"] == approx([2.0, 1.0])
    assert l1["params"]["normalize"] is True
    # slice 1: three layers at t = 0, 0.5, 1; expert0 takes the slice's weight 3.0
    for out_layer, t in ((2, 0.0), (3, 0.5), (4, 1.0)):
        j = jobs[f"model.layers.{out_layer}.self_attn.q_proj.weight"]
        assert j["t"] == t
        assert j["params"]["weight"] == approx([3.0, t])
    # slice 2 has one layer: t = 1 (mergekit)
    j5 = jobs["model.layers.5.mlp.gate_proj.weight"]
    assert j5["t"] == 1.0 and j5["params"]["weight"] == approx([2.0, 1.0])
    # outside the stack: embeddings merged over slice 0's sources, norm/head over the last slice's, at t = 0
    emb = jobs["model.embed_tokens.weight"]
    assert emb["method"] == "linear" and emb["t"] == 0.0
    assert emb["params"]["weight"] == approx([2.0, 1.0])
    head = jobs["lm_head.weight"]
    assert [i["model"] for i in head["inputs"]] == ["expert0", "expert1"]
    assert head["params"]["weight"] == approx([2.0, 0.0])


def test_base_model_handling(tmp_path, family):
    b, e0, e1 = family["base"], family["expert0"], family["expert1"]
    lin = write_recipe(
        tmp_path / "lin.yaml",
        f"merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {e0}\n    parameters: {{weight: 2.0}}\n"
        f"  - model: {e1}\nparameters: {{weight: 0.5}}\n",
    )
    _, jobs = plan_jobs(lin)  # linear merges an unlisted base like any model (mergekit appends it)
    j = jobs["model.layers.0.mlp.up_proj.weight"]
    assert [i["model"] for i in j["inputs"]] == ["expert0", "expert1", "base"]
    assert j["params"]["weight"] == approx([2.0, 0.5, 0.5]) and j["base"] is None
    no_w = write_recipe(
        tmp_path / "no_w.yaml", f"merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {e0}\n"
    )
    with pytest.raises(RecipeError, match=r"no_w.yaml:2: .*base_model.*weight"):
        load_recipe(no_w)
    listed = write_recipe(
        tmp_path / "listed.yaml",
        f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {e0}\n",
    )
    _, jobs = plan_jobs(listed)  # a listed base stays the base, never a source
    assert [i["model"] for i in jobs["lm_head.weight"]["inputs"]] == ["expert0"]
    assert jobs["lm_head.weight"]["base"] == "base"
    sl = write_recipe(
        tmp_path / "sl.yaml",
        f"merge_method: ties\nbase_model: {b}\nslices:\n  - sources:\n"
        f"      - {{model: {e0}, layer_range: [0, 4]}}\n      - {{model: {e1}, layer_range: [0, 4]}}\n",
    )
    with pytest.raises(PlanError, match="base model among the slice's sources"):
        build_plan(load_recipe(sl))


def _plan_json(path):
    p = build_plan(load_recipe(path))
    try:
        d = p.to_json()
    finally:
        p.close()
    d.pop("recipe")
    return d


@pytest.mark.parametrize("make", [ties_recipe, slices_recipe])
def test_convert_round_trip(tmp_path, family, make):
    src = make(tmp_path, family)
    res = run_cli("convert", src)
    assert res.exit_code == 0, res.stderr
    assert "merge_method" not in res.stdout and "method:" in res.stdout
    native = write_recipe(tmp_path / "native.yaml", res.stdout)
    assert _plan_json(native) == _plan_json(src)
    assert run_cli("convert", native).stdout == res.stdout  # native in, the same native out


def test_dtypes_tokenizer_refs(tmp_path, family):
    b, e0 = family["base"], family["expert0"]
    r = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {e0}\n"
        f"dtype: bfloat16\ntokenizer_source: {e0}\nchat_template: chatml\n",
    )
    recipe = load_recipe(r)
    assert (recipe.dtype, recipe.out_dtype, recipe.donor, recipe.chat_template) == (
        "bfloat16", "bfloat16", str(e0), "chatml"
    )  # fmt: skip
    r2 = write_recipe(
        tmp_path / "r2.yaml",
        "merge_method: linear\nmodels:\n  - model: org/a@v1.2\n  - model: {model: {path: org/b, revision: main}}\n"
        "dtype: bfloat16\nout_dtype: float32\ntokenizer: {source: union}\n",
    )
    recipe = load_recipe(r2)
    assert [m.model for m in recipe.models] == ["org/a@v1.2", "org/b@main"]
    assert (recipe.dtype, recipe.out_dtype, recipe.donor) == ("bfloat16", "float32", "base")


@pytest.mark.parametrize(
    "text, line, expect",
    [
        ("merge_method: tie\nmodels: [{model: a}]\n", 1, "did you mean 'ties'"),
        ("merge_method: linear\nmodles:\n  - model: a\n", 2, "did you mean 'models'"),
        ("merge_methd: linear\nmodels: [{model: a}]\n", 1, "did you mean 'merge_method'"),
        ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_rang: [0, 1]}\n", 4, "did you mean 'layer_range'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [{fliter: mlp, value: 1}]\n", 5,
         "did you mean 'filter'"),
        ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {densty: 0.5}\n", 5,
         "did you mean 'density'"),
        ("merge_method: linear\nmodules: {}\nmodels: [{model: a}]\n", 2, "not supported"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_key(tmp_path, text, line, expect):
    path = write_recipe(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"bad.yaml:{line}:" in str(e.value) and expect in str(e.value)
    res = run_cli("validate", path)
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_plan_json_cli_reads_mergekit_recipes(tmp_path, family):
    res = run_cli("plan", ties_recipe(tmp_path, family), "--json")
    assert res.exit_code == 0, res.stderr
    jobs = {j["name"]: j for j in json.loads(res.stdout)["jobs"]}
    assert jobs["model.layers.0.mlp.up_proj.weight"]["params"]["weight"] == approx([0.7, 0.1, 0.25])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_rounds_like_a_stacked_torch_sum(dtype):
    g = torch.Generator().manual_seed(0)
    terms = [torch.randn(64, 33, generator=g).to(dtype) * 10**k for k in range(-2, 2)]
    weights = [0.3, -1.7, 0.123456789, 2.0]
    stacked = (torch.stack(terms) * torch.tensor(weights, dtype=dtype).reshape(-1, 1, 1)).sum(dim=0)
    assert torch.equal(weighted_sum(terms, weights, terms[0]), stacked)


def test_slerp_in_bf16_near_parallel_is_finite_and_matches_fp32():
    from merge_cli.methods.slerp import slerp_vectors

    g = torch.Generator().manual_seed(1)
    a = torch.randn(4096, generator=g)
    b = a + 1e-3 * torch.randn(4096, generator=g)  # cos ~ 0.9999995: rounds to 1.0 in bf16
    out = slerp_vectors(0.6, a.bfloat16(), b.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # near-parallel -> lerp, computed in fp32 and rounded once
    expect = (0.4 * a.bfloat16().float() + 0.6 * b.bfloat16().float()).bfloat16()
    assert torch.equal(out, expect)
