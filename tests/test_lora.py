"""LoRA / PEFT adapters as sources, checked against peft's own merge_and_unload."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_CONFIG, load_output, run_cli, write_recipe
from safetensors.torch import load_file, save_file

from merge_cli.errors import CheckpointError
from merge_cli.io.refs import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed: int):
    cfg = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny Llama base, a PEFT adapter exercising rsLoRA, rank/alpha patterns, an embedding LoRA and
    modules_to_save, and peft's merge_and_unload of the two as the reference."""
    root = tmp_path_factory.mktemp("lora")
    base = _llama(0)
    base.save_pretrained(root / "base")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
        init_lora_weights=False,  # random A and B, so every update is non-zero
    )
    model = peft.get_peft_model(_llama(0), config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(root / "adapter")
    reference = model.merge_and_unload().state_dict()
    return root, {k: v.detach().clone() for k, v in reference.items()}


def test_adapter_matches_peft_merge_and_unload(lora_setup, tmp_path):
    root, reference = lora_setup
    recipe = write_recipe(
        tmp_path / "r.yaml", {"method": "passthrough", "models": [f"{root}/base+{root}/adapter"]}
    )
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    out = load_output(tmp_path / "out")
    base = load_file(str(root / "base" / "model.safetensors"))
    assert set(out) == set(reference)
    worst = max(float((out[k] - reference[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst
    changed = [k for k in reference if not torch.equal(reference[k], base[k])]
    # q, v, down in 4 layers + embedding LoRA + lm_head (modules_to_save)
    assert len(changed) == 3 * 4 + 2
    print(f"max |ours - peft merge_and_unload| = {worst:.3g} over {len(changed)} adapted tensors")


def test_dict_syntax_and_weighted_use(lora_setup, tmp_path):
    """`{model: base, lora: adapter}` is the same source; task arithmetic with it scales the LoRA update."""
    root, reference = lora_setup
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "method": "task_arithmetic",
            "base_model": str(root / "base"),
            "models": [{"model": str(root / "base"), "lora": str(root / "adapter"), "name": "tuned"}],
            "parameters": {"lambda": 0.5},
        },
    )
    assert run_cli("run", recipe, tmp_path / "out", "-q").exit_code == 0
    out = load_output(tmp_path / "out")
    base = load_file(str(root / "base" / "model.safetensors"))
    name = "model.layers.2.self_attn.v_proj.weight"
    want = base[name] + 0.5 * (reference[name] - base[name])
    assert torch.allclose(out[name], want, atol=1e-6)
    lock = (tmp_path / "out" / "recipe.lock.yaml").read_text()
    assert "adapter_model.safetensors" in lock and "adapter_config.json" in lock
    assert "lora" in (tmp_path / "out" / "README.md").read_text()


def test_row_reads_of_adapted_tensors(lora_setup):
    root, reference = lora_setup
    ck = open_checkpoint(f"{root}/base+{root}/adapter")
    try:
        for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
            full = reference[name]
            assert torch.allclose(ck.read_rows(name, 3, 11), full[3:11], atol=1e-6)
    finally:
        ck.close()


def _adapter(folder, tensors, **cfg):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg})
    )
    return folder


def test_hand_computed_scale_and_errors(lora_setup, tmp_path):
    root, _ = lora_setup
    name = "model.layers.0.self_attn.k_proj"
    a, b = torch.randn(2, 64), torch.randn(32, 2)
    _adapter(
        tmp_path / "plain",
        {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b},
    )
    ck = open_checkpoint(f"{root}/base+{tmp_path}/plain")
    w = load_file(str(root / "base" / "model.safetensors"))[name + ".weight"]
    assert torch.allclose(ck.read(name + ".weight"), w + (4 / 2) * b @ a, atol=1e-5)  # alpha / r
    ck.close()
    _adapter(tmp_path / "dora", {f"base_model.model.{name}.lora_A.weight": a}, use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(f"{root}/base+{tmp_path}/dora")
    _adapter(
        tmp_path / "wrong",
        {"base_model.model.model.nope.lora_A.weight": a, "base_model.model.model.nope.lora_B.weight": b},
    )
    with pytest.raises(CheckpointError, match="model.nope.weight"):
        open_checkpoint(f"{root}/base+{tmp_path}/wrong")
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        open_checkpoint(f"{root}/base+{root}/base")


# issue 15: mergekit's adapter syntax in a mergekit-format recipe, and every documented adapter form in
# both recipe formats, give peft's merge_and_unload: bitwise in fp32, its bf16 rounding in bf16.
ADAPTER_FORMS = {
    "native plus": lambda b, a, dt: {"method": "linear", "models": [f"{b}+{a}"], **dt},
    "native keys": lambda b, a, dt: {"method": "linear", "models": [{"model": b, "lora": a}], **dt},
    "mergekit plus": lambda b, a, dt: {
        "merge_method": "linear",
        "models": [{"model": f"{b}+{a}", "parameters": {"weight": 1.0}}],
        **dt,
    },
    "mergekit keys": lambda b, a, dt: {
        "merge_method": "linear",
        "models": [{"model": {"model": {"path": b}, "lora": {"path": a}}, "parameters": {"weight": 1.0}}],
        **dt,
    },
    "mergekit plain-string keys": lambda b, a, dt: {
        "merge_method": "linear",
        "models": [{"model": {"model": b, "lora": a}, "parameters": {"weight": 1.0}}],
        **dt,
    },
}


@pytest.mark.parametrize("form", sorted(ADAPTER_FORMS))
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_adapter_forms_in_both_formats_equal_peft(lora_setup, tmp_path, form, out_dtype):
    root, reference = lora_setup
    data = ADAPTER_FORMS[form](
        str(root / "base"), str(root / "adapter"), {"dtype": "float32", "out_dtype": out_dtype}
    )
    recipe = write_recipe(tmp_path / "r.yaml", data)
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    out = load_output(tmp_path / "out")
    assert set(out) == set(reference)
    want_dtype = getattr(torch, out_dtype)
    for name, ref in reference.items():
        assert out[name].dtype == want_dtype
        # fp32: exactly peft's merged weights; bf16: those weights rounded once to bf16
        assert torch.equal(out[name], ref.to(want_dtype)), name


def test_mergekit_lora_reference_keeps_revisions(tmp_path):
    """Either side of a mergekit `+` reference, and either dict path, may carry a revision."""
    from merge_cli.recipe import load_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": "org/base@v1+org/adapter@abc", "parameters": {"weight": 1.0}},
                {
                    "model": {
                        "model": {"path": "org/base", "revision": "v2"},
                        "lora": {"path": "org/ad", "revision": "r3"},
                    },
                    "parameters": {"weight": 1.0},
                },
            ],
        },
    )
    assert [m.model for m in load_recipe(recipe).models] == [
        "org/base@v1+org/adapter@abc",
        "org/base@v2+org/ad@r3",
    ]
