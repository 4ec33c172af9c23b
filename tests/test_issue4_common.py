"""§19 'every method' invariants for the issue-4 methods: keys, shapes and dtypes of the base, integer
buffers copied, no NaN/Inf when a task vector is zero; whole-model TIES is permutation-invariant."""

import pytest
import torch
from helpers import load_output, run_cli, write_model, write_recipe
from safetensors.torch import load_file

PARAMS = {
    "pcb": {"density": 0.3},
    "ties": {"granularity": "model", "density": 0.3},
    "layer_swap": {"bottom": 1, "top": 0, "transition_bottom": 0, "transition_top": 0},
    "tsv": {}, "iso_c": {}, "iso_cts": {}, "emr": {},
}  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, family_bf16):
    """The bf16 family plus an expert equal to the base and a base with an integer buffer."""
    root = tmp_path_factory.mktemp("zoo")
    base = load_file(str(family_bf16["base"] / "model.safetensors"))
    ex = load_file(str(family_bf16["expert0"] / "model.safetensors"))
    buf = {"model.layers.0.self_attn.rotary_emb.inv_freq_idx": torch.arange(8, dtype=torch.int64)}
    cfg = {"num_hidden_layers": 4}
    return {
        "base": write_model(root / "base", {**base, **buf}, cfg),
        "same": write_model(root / "same", {**base, **buf}, cfg),
        "ex": write_model(root / "ex", {**ex, **buf}, cfg),
    }


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_keys_shapes_dtypes_buffers_and_zero_task_vectors(zoo, tmp_path, method):
    models = (
        [{"model": str(zoo["ex"])}]
        if method == "layer_swap"
        else [{"model": str(zoo["same"])}, {"model": str(zoo["ex"])}]
    )
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base_model": str(zoo["base"]), "models": models, "method": method, "parameters": PARAMS[method],
    })  # fmt: skip
    res = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    base, got = load_output(zoo["base"]), load_output(tmp_path / "out")
    assert sorted(got) == sorted(base)
    for k, v in got.items():
        assert v.shape == base[k].shape and v.dtype == base[k].dtype, k
        if v.is_floating_point():
            assert torch.isfinite(v.float()).all(), k
        else:
            assert torch.equal(v, base[k]), k


def test_whole_model_ties_is_permutation_invariant(family, tmp_path):
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        recipe = write_recipe(tmp_path / f"r{order[0]}.yaml", {
            "base_model": str(family["base"]),
            "models": [{"model": str(family[f"expert{i}"]), "parameters": {"density": 0.2 + 0.1 * i}} for i in order],
            "method": "ties", "parameters": {"granularity": "model"}, "out_dtype": "float32",
        })  # fmt: skip
        assert run_cli("run", recipe, tmp_path / f"o{order[0]}", "--quiet").exit_code == 0
        outs.append(load_output(tmp_path / f"o{order[0]}"))
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-6), k


@pytest.mark.parametrize(
    ("method", "params"),
    [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("pcb", {"granularity": "tensor"}), ("layer_swap", PARAMS["layer_swap"]),
     ("pcb", {"granularity": "model"})],
)  # fmt: skip
def test_row_chunked_merge_equals_whole(family, tmp_path, method, params):
    """A tiny memory budget makes the engine merge big tensors in row chunks: same output."""
    n = 1 if method == "layer_swap" else 2
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base_model": str(family["base"]), "models": [{"model": str(family[f"expert{i}"])} for i in range(n)],
        "method": method, "parameters": params, "out_dtype": "float32",
    })  # fmt: skip
    assert run_cli("run", recipe, tmp_path / "whole", "--quiet").exit_code == 0
    res = run_cli("run", recipe, tmp_path / "chunked", "--quiet", "--max-memory", "64KB")
    assert res.exit_code == 0, res.output
    a, b = load_output(tmp_path / "whole"), load_output(tmp_path / "chunked")
    for k in a:
        assert torch.equal(a[k], b[k]), k
