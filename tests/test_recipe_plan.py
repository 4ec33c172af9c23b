"""Recipe validation (exact one-line messages), parameter resolution, overrides, gradients and plan errors."""

import pytest
import torch
from helpers import run_cli, write_model, write_recipe

from merge_cli.errors import CheckpointError, PlanError, RecipeError
from merge_cli.modules import classify
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe, parse_size
from merge_cli.recipe.params import at_depth


def recipe_file(tmp_path, text: str):
    return write_recipe(tmp_path / "r.yaml", text)


@pytest.mark.parametrize(
    "text,message",
    [
        ("base_model: a\nmodels: [b]\nmethd: ties\n", "{p}:3: unknown key 'methd' (did you mean 'method'?)"),
        (
            "base_model: a\nmodels: [b]\nmethod: tie\n",
            "{p}:3: unknown merge method 'tie' (did you mean 'ties'?); `merge-cli methods` lists them",
        ),
        (
            "base_model: a\nmodels:\n  - model: b\n    parameters: {densty: 0.3}\nmethod: ties\n",
            "{p}:4: unknown per-model parameter 'densty' for ties (did you mean 'density'?); known: density, weight",
        ),
        (
            "base_model: a\nmodels:\n  - model: b\n    parameters: {density: [0.3, 1.5]}\nmethod: ties\n",
            "{p}:4: models[0].parameters.density=1.5 is invalid for ties: Input should be less than or equal to 1",
        ),
        (
            "base_model: a\nmodels: [b\nmethod: ties\n",
            "{p}:3:7: YAML syntax error: expected ',' or ']', but got ':'",
        ),
        (
            "models: [b]\nmethod: ties\n",
            "{p}:2: method 'ties' needs `base_model:`; add the pretrained model it fine-tunes from",
        ),
        (
            "base_model: a\nmodels: [b]\nmethod: ties\nparameters: {lamda: 1}\n",
            "{p}:4: unknown parameter 'lamda' for ties (did you mean 'lambda'?); known: density, granularity, lambda, merge_func, numerics, topk, weight, weighted_election",
        ),
        (
            "base_model: a\nmodels: [b]\nmethod: ties\noverrides:\n  - match: atention\n",
            "{p}:5: 'atention' is not a module group (did you mean 'attention'?); use one of embed, attention, mlp, norm, "
            "lm_head, other, a glob like '*.q_proj.*', or 're:REGEX'",
        ),
        (
            "models: [b]\nmethod: linear\nshard_size: 5 potatoes\n",
            "{p}:3: cannot read size '5 potatoes'; write it like 5GB, 500MB or 2GiB",
        ),
        (
            "models: [b]\nmethod: linear\nout_dtype: fp8\n",
            "{p}:3: unknown dtype 'fp8'; use one of float32, float16, bfloat16",
        ),
        ("models: [b]\nmethod: linear\nmethod: ties\n", "{p}:3: key 'method' appears twice"),
        ("- a\n- b\n", "{p}: a recipe must be a YAML mapping of keys (got list)"),
        ("", "{p}: the recipe is empty"),
        (
            "models: [a, b]\nmethod: passthrough\n",
            "{p}:2: method 'passthrough' takes 1 source model(s); the recipe gives 2",
        ),
    ],
)
def test_recipe_errors_are_one_exact_line(tmp_path, text, message):
    p = recipe_file(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == message.format(p=p)


def test_cli_error_is_one_line_exit_2(tmp_path):
    p = recipe_file(tmp_path, "base_model: a\nmodels: [b]\nmethod: tie\n")
    r = run_cli("validate", p)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {p}:3: unknown merge method 'tie' (did you mean 'ties'?); `merge-cli methods` lists them"
    ]
    assert "Traceback" not in r.stderr + r.stdout


def test_gradient_interpolation():
    assert at_depth([0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert at_depth([0.2, 0.4, 1.0], 0.75) == pytest.approx(0.7)  # halfway between 0.4 and 1.0
    assert at_depth([0.2, 0.4, 1.0], 1.0) == pytest.approx(1.0)
    assert at_depth(0.3, 0.9) == 0.3
    assert at_depth(["a", "b"], 0.9) == "b" and at_depth(["a", "b"], 0.4) == "a"


def test_parse_size():
    assert parse_size("5GB", "x") == 5_000_000_000
    assert parse_size("2GiB", "x") == 2 * 1024**3
    assert parse_size("500MB", "x") == 500_000_000
    assert parse_size("1B", "x") == 1 and parse_size(4096, "x") == 4096


def test_module_classification():
    assert classify("model.layers.3.self_attn.q_proj.weight") == (3, "attention")
    assert classify("model.layers.12.mlp.down_proj.weight") == (12, "mlp")
    assert classify("model.layers.0.input_layernorm.weight") == (0, "norm")
    assert classify("model.embed_tokens.weight") == (None, "embed")
    assert classify("model.norm.weight") == (None, "norm")
    assert classify("lm_head.weight") == (None, "lm_head")
    assert classify("transformer.h.2.attn.c_attn.weight") == (2, "attention")


# -- plan ------------------------------------------------------------------------------------------
def _jobs(plan):
    return {j.name: j for j in plan.jobs}


def test_plan_resolves_gradients_overrides_and_precedence(tmp_path, family):
    text = f"""
base_model: {family["base"]}
models:
  - model: {family["expert0"]}
    name: e0
    parameters: {{density: [0.2, 0.8], weight: 2.0}}
  - model: {family["expert1"]}
    name: e1
    parameters: {{density: 0.5}}
method: ties
parameters: {{lambda: 0.9, density: 0.1}}
overrides:
  - match: attention
    layers: [0, 2]
    parameters: {{density: 0.6}}
    model_parameters: {{e1: {{density: 0.7}}}}
  - match: [embed, lm_head]
    method: linear
  - match: "*.mlp.down_proj.*"
    method: task_arithmetic
    parameters: {{lambda: 0.5}}
  - match: mlp
    layers: [3, 4]
    method: linear
"""
    plan = build_plan(load_recipe(recipe_file(tmp_path, text)))
    jobs = _jobs(plan)
    L = 4  # t = layer / 3
    q0 = jobs["model.layers.0.self_attn.q_proj.weight"]
    assert q0.method == "ties"
    assert q0.params["density"] == [
        0.6,
        0.7,
    ]  # override beats the model's own; model_parameters beat override
    assert q0.params["lambda_"] == 0.9 and q0.params["weight"] == [2.0, 1.0]
    q3 = jobs[
        "model.layers.3.self_attn.q_proj.weight"
    ]  # no override (layers 0-1 only): model gradient at t = 1
    assert q3.params["density"] == pytest.approx([0.8, 0.5])
    g2 = jobs["model.layers.2.mlp.gate_proj.weight"]  # t = 2/3 -> 0.2 + 0.6 * 2/3 = 0.6
    assert g2.params["density"] == pytest.approx([0.2 + 0.6 * 2 / (L - 1), 0.5])
    assert jobs["model.embed_tokens.weight"].method == "linear"
    assert jobs["lm_head.weight"].method == "linear" and jobs["lm_head.weight"].weights == [2.0, 1.0]
    d3 = jobs[
        "model.layers.3.mlp.down_proj.weight"
    ]  # first match wins: the glob precedes the layer-3 mlp override
    assert d3.method == "task_arithmetic" and d3.params["lambda_"] == 0.5
    assert jobs["model.layers.3.mlp.up_proj.weight"].method == "linear"
    assert jobs["model.norm.weight"].method == "ties" and jobs["model.norm.weight"].params["density"] == [
        0.2,
        0.5,
    ]
    assert [m.label for m in plan.models] == ["base", "e0", "e1"]
    assert q0.base.model == 0 and [i.model for i in q0.inputs] == [1, 2]
    plan.close()


def test_plan_orders_tensors_and_assigns_shards(tmp_path, family):
    text = f"base_model: {family['base']}\nmodels: [{family['expert0']}]\nmethod: task_arithmetic\nshard_size: 40KB\n"
    plan = build_plan(load_recipe(recipe_file(tmp_path, text)))
    names = [j.name for j in plan.jobs]
    # layers first, then the tensors outside the stack (issue 15: the slow embedding no longer holds back
    # the first shard, so a killed run has journaled the layers)
    assert names[0].startswith("model.layers.0.")
    assert names.index("model.embed_tokens.weight") > max(i for i, n in enumerate(names) if ".layers." in n)
    assert (
        names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.layers.10.mlp.up_proj.weight")
        if any("layers.10" in n for n in names)
        else True
    )
    assert names.index("model.layers.1.self_attn.q_proj.weight") < names.index(
        "model.layers.2.input_layernorm.weight"
    )
    for s in plan.shards:
        assert s.nbytes <= 40_000 or len(s.jobs) == 1
    assert len(plan.shards) > 1
    assert plan.shards[0].filename == f"model-00001-of-{len(plan.shards):05d}.safetensors"
    assert sorted(i for s in plan.shards for i in s.jobs) == list(range(len(plan.jobs)))
    assert plan.out_dtype == "F32" and plan.config["torch_dtype"] == "float32"
    plan.close()


def _pair(tmp_path, extra_b=None, shape_b=(4, 3)):
    a = write_model(
        tmp_path / "a", {"x.weight": torch.zeros(4, 3), "model.embed_tokens.weight": torch.zeros(10, 3)}
    )
    tb = (
        {"x.weight": torch.zeros(*shape_b), "model.embed_tokens.weight": torch.zeros(12, 3)}
        if extra_b is None
        else extra_b
    )
    b = write_model(tmp_path / "b", tb)
    return a, b


def test_plan_errors_shape_vocab_missing(tmp_path):
    a, b = _pair(
        tmp_path, extra_b={"x.weight": torch.zeros(4, 3), "model.embed_tokens.weight": torch.zeros(12, 3)}
    )
    r = recipe_file(tmp_path, f"base_model: {a}\nmodels: [{b}]\nmethod: task_arithmetic\n")
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(r))
    assert str(e.value) == (
        # issue 7: the message names the recipe's `vocab:` options (merge_cli/io/vocab.py)
        "tensor 'model.embed_tokens.weight': vocabulary sizes differ ('base' 10, 'b' 12); add `vocab: crop` "
        "(keep the 10 rows all models have) or `vocab: pad_from_base` (the base's 10 rows, missing ones taken "
        "from the base) to the recipe, or merge models that share one tokenizer vocabulary"
    )
    c = write_model(
        tmp_path / "c", {"x.weight": torch.zeros(4, 2), "model.embed_tokens.weight": torch.zeros(10, 3)}
    )
    r = recipe_file(tmp_path, f"base_model: {a}\nmodels: [{c}]\nmethod: task_arithmetic\n")
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(r))
    assert str(e.value) == (
        "tensor 'x.weight': shape [4, 2] in model 'c' but [4, 3] in 'base'; these models cannot be merged tensor by tensor"
    )
    d = write_model(tmp_path / "d", {"x.weight": torch.zeros(4, 3)})
    r = recipe_file(tmp_path, f"base_model: {a}\nmodels: [{d}]\nmethod: task_arithmetic\n")
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(r))
    assert str(e.value) == (
        f"tensor 'model.embed_tokens.weight' is missing from model 'd' ({d}); all models must share the base's tensor names"
    )


def test_plan_missing_model_and_linear_zero_weights(tmp_path):
    a, _ = _pair(tmp_path)
    r = recipe_file(tmp_path, "models: [nowhere]\nmethod: linear\n")
    with pytest.raises(CheckpointError) as e:
        build_plan(load_recipe(r))
    assert str(e.value) == (
        f"model 'nowhere': no such file or folder (looked in {tmp_path / 'nowhere'}, nowhere); fix the path in the recipe"
    )
    r = recipe_file(tmp_path, f"models:\n  - model: {a}\n    parameters: {{weight: 0}}\nmethod: linear\n")
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(r))
    assert str(e.value) == (
        "tensor 'model.embed_tokens.weight' (linear): weights sum to 0 with normalize: true; "
        "give non-zero weights or set normalize: false"
    )


def test_integer_buffers_are_copied_from_base(tmp_path):
    a = write_model(tmp_path / "a", {"w": torch.ones(3), "buf.position_ids": torch.arange(5)})
    b = write_model(tmp_path / "b", {"w": torch.full((3,), 3.0), "buf.position_ids": torch.arange(5) * 7})
    r = recipe_file(tmp_path, f"base_model: {a}\nmodels: [{b}]\nmethod: task_arithmetic\n")
    plan = build_plan(load_recipe(r))
    job = _jobs(plan)["buf.position_ids"]
    assert job.method == "passthrough" and job.inputs[0].model == 0 and job.out_dtype == "I64"
    plan.close()


def test_slices_plan_renames_layers_and_rewrites_config(tmp_path, family):
    text = f"""
base_model: {family["base"]}
method: passthrough
slices:
  - sources: [{{model: {family["expert0"]}, layers: [0, 3]}}]
  - sources: [{{model: {family["expert1"]}, layers: [2, 4]}}]
"""
    plan = build_plan(load_recipe(recipe_file(tmp_path, text)))
    jobs = _jobs(plan)
    assert plan.num_layers == 5 and plan.config["num_hidden_layers"] == 5
    j = jobs["model.layers.3.mlp.up_proj.weight"]  # output layer 3 = expert1's layer 2
    assert (
        plan.models[j.inputs[0].model].label == "expert1"
        and j.inputs[0].name == "model.layers.2.mlp.up_proj.weight"
    )
    j = jobs["model.layers.4.self_attn.o_proj.weight"]
    assert j.inputs[0].name == "model.layers.3.self_attn.o_proj.weight"
    assert plan.models[jobs["model.embed_tokens.weight"].inputs[0].model].label == "base"
    assert not any("layers.5." in n for n in jobs)
    plan.close()
    bad = text.replace("[2, 4]", "[2, 6]").replace("[0, 3]", "[0, 4]")
    with pytest.raises(PlanError) as e:
        build_plan(load_recipe(recipe_file(tmp_path, bad)))
    assert str(e.value) == "slice 1: layers [2, 6] of model 'expert1' go past its 4 layers"
