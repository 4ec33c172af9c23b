"""Issue 6.1: every bad input ends with one exact line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIG, llama_state_dict, load_output, run_cli, write_model, write_recipe
from safetensors.torch import save_file

from merge_cli.io.writer import temp_dir_for


def one_error(result) -> str:
    """The single error line of a failed CLI run (asserting exit code 2 and nothing else on stderr)."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return llama_state_dict(TINY_CONFIG, torch.Generator().manual_seed(1))


def test_yaml_syntax_names_line_and_column(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", "method: linear\nmodels: [a, b\nparameters: {}\n")
    assert (
        one_error(run_cli("validate", r)) == f"{r}:3:11: YAML syntax error: expected ',' or ']', but got ':'"
    )


def test_unknown_key_did_you_mean(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", "method: linear\nmodels: [a, b]\nparamters: {}\n")
    assert one_error(run_cli("validate", r)) == f"{r}:3: unknown key 'paramters' (did you mean 'parameters'?)"


def test_unknown_method_did_you_mean(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", "method: lineer\nmodels: [a, b]\n")
    assert one_error(run_cli("validate", r)) == (
        f"{r}:1: unknown merge method 'lineer' (did you mean 'linear'?); `merge-cli methods` lists them"
    )


def test_out_of_range_parameter(tmp_path):
    r = write_recipe(
        tmp_path / "r.yaml", "method: ties\nbase_model: a\nmodels: [a, b]\nparameters: {density: 1.5}\n"
    )
    assert one_error(run_cli("validate", r)) == (
        f"{r}:4: parameters.density=1.5 is invalid for ties: Input should be less than or equal to 1"
    )


def test_missing_model_path(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", {"method": "linear", "models": ["nope1", "nope2"]})
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"model 'nope1': no such file or folder (looked in {tmp_path}/nope1, nope1); fix the path in the recipe"
    )
    assert not (tmp_path / "out").exists()


def test_unreadable_model_file(tmp_path, family):
    bad = tmp_path / "bad"
    (bad / "model.safetensors").mkdir(parents=True)  # a folder where the weights file should be
    r = write_recipe(tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(bad)]})
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"{bad}/model.safetensors: cannot read (Is a directory); check the path and permissions"
    )


def test_not_a_safetensors_file(tmp_path, family):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    r = write_recipe(tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(bad)]})
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"{bad}: not a safetensors file (5 bytes, shorter than the 8-byte header length); re-download or re-save the file"
    )


def test_architecture_mismatch_and_override(tmp_path, family, sd):
    cfg = dict(TINY_CONFIG, architectures=["MistralForCausalLM"])
    write_model(tmp_path / "mis", sd, cfg)
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "mis")]}
    )
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        "models have different architectures: 'base' is LlamaForCausalLM but 'mis' is MistralForCausalLM; "
        "pass --allow-arch-mismatch if the tensors really line up"
    )
    ok = run_cli("run", r, tmp_path / "out", "--allow-arch-mismatch", "-q")
    assert ok.exit_code == 0, ok.stderr
    assert len(load_output(tmp_path / "out")) == len(sd)


def test_tensor_missing_from_a_source(tmp_path, family, sd):
    part = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    write_model(tmp_path / "miss", part, TINY_CONFIG)
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "miss")]}
    )
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"tensor 'model.layers.1.mlp.up_proj.weight' is missing from model 'miss' ({tmp_path}/miss); "
        "all models must share the base's tensor names"
    )


def test_shape_mismatch(tmp_path, family, sd):
    write_model(
        tmp_path / "shape", {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(64, 64)}, TINY_CONFIG
    )
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "shape")]}
    )
    assert one_error(run_cli("plan", r)) == (
        "tensor 'model.layers.0.mlp.up_proj.weight': shape [64, 64] in model 'shape' but [128, 64] in 'base'; "
        "these models cannot be merged tensor by tensor"
    )


def test_vocabulary_mismatch_explains_options(tmp_path, family, sd):
    write_model(tmp_path / "vocab", {**sd, "model.embed_tokens.weight": torch.zeros(130, 64)}, TINY_CONFIG)
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "vocab")]}
    )
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        "tensor 'model.embed_tokens.weight': vocabulary sizes differ ('base' 128, 'vocab' 130); add `vocab: crop` "
        "(keep the 128 rows all models have) or `vocab: pad_from_base` (the base's 128 rows, missing ones taken "
        "from the base) to the recipe, or merge models that share one tokenizer vocabulary"
    )


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_source_tensor_and_override(tmp_path, family, sd, bad):
    name = "model.layers.2.self_attn.k_proj.weight"
    t = sd[name].clone()
    t[0, 0] = float(bad)
    t[1, 1] = -float(bad)
    write_model(tmp_path / "nan", {**sd, name: t}, TINY_CONFIG)
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "nan")]}
    )
    what = "2 NaN" if bad == "nan" else "2 Inf"
    assert one_error(run_cli("run", r, tmp_path / "out", "-q")) == (
        f"model 'nan': tensor '{name}' holds {what} value(s) out of 2048; the file may be corrupt; "
        "pass --allow-nonfinite to merge anyway"
    )
    assert not (tmp_path / "out").exists() and not temp_dir_for(tmp_path / "out").exists()
    ok = run_cli("run", r, tmp_path / "out", "-q", "--allow-nonfinite")
    assert ok.exit_code == 0, ok.stderr
    assert not torch.isfinite(load_output(tmp_path / "out")[name]).all()


def test_empty_model(tmp_path, family):
    (tmp_path / "empty").mkdir()
    save_file({}, str(tmp_path / "empty" / "model.safetensors"))
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "empty")]}
    )
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"model '{tmp_path}/empty': {tmp_path}/empty holds no tensors; is it the right path?"
    )


def test_recipe_file_missing(tmp_path):
    assert (
        one_error(run_cli("validate", tmp_path / "none.yaml"))
        == f"{tmp_path}/none.yaml: recipe file not found"
    )


def test_empty_recipe(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", "")
    assert one_error(run_cli("validate", r)) == f"{r}: the recipe is empty"


def test_model_folder_without_weights(tmp_path, family):
    (tmp_path / "nothing").mkdir()
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(tmp_path / "nothing")]}
    )
    assert one_error(run_cli("plan", r)) == (
        f"model '{tmp_path}/nothing': {tmp_path}/nothing has no model.safetensors or "
        "model.safetensors.index.json; is it an HF model folder?"
    )


def test_output_already_exists(tmp_path, family):
    (tmp_path / "out").mkdir()
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), str(family["expert0"])]}
    )
    assert one_error(run_cli("run", r, tmp_path / "out")) == (
        f"output {tmp_path}/out already exists; pass --overwrite to replace it"
    )


def test_control_characters_in_a_message_stay_on_one_line(tmp_path):
    r = write_recipe(tmp_path / "r.yaml", 'method: linear\nmodels: [a, b]\n"bad\\nkey\\r": 1\n')
    assert one_error(run_cli("validate", r)) == f"{r}:3: unknown key 'bad\\nkey\\r'"
