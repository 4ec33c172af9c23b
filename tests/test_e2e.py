"""End to end through the CLI: the written model loads in transformers and matches a plainly merged state dict."""

import json

import pytest
import torch
from helpers import load_output, run_cli, write_recipe
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")


def _state(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def plain_ties(base, xs, densities, weights):
    """An independent TIES: stable sort for each top-k, explicit sign vote, weighted mean of agreeing entries."""
    taus = []
    for x, density in zip(xs, densities):
        tau = (x - base).flatten()
        k = int(density * tau.numel())
        keep = torch.sort(-tau.abs(), stable=True).indices[:k]
        trimmed = torch.zeros_like(tau)
        trimmed[keep] = tau[keep]
        taus.append(trimmed)
    total = sum(taus)
    sign = torch.where(total >= 0, 1.0, -1.0)  # an exact zero sum counts as positive
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for w, t in zip(weights, taus):
        agree = (torch.sign(t) == sign).float()
        num += w * t * agree
        den += w * agree
    den[den == 0] = 1.0
    return base + (num / den).reshape(base.shape)


def logits_of(model_dir_or_sd, cfg_dir, ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_dir_or_sd, dict):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir))
        model.load_state_dict(model_dir_or_sd)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir_or_sd)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_ties_merge_loads_in_transformers_with_matching_logits(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "ties.yaml",
        f"""
base_model: {family["base"]}
models:
  - model: {family["expert0"]}
    parameters: {{density: 0.3, weight: 1.0}}
  - model: {family["expert1"]}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {family["expert2"]}
    parameters: {{density: 0.4}}
method: ties
out_dtype: float32
shard_size: 100KB
""",
    )
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    for name in (
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "recipe.yaml",
        "merge_report.json",
        "manifest.json",
    ):
        assert (out / name).is_file(), name
    base, xs = _state(family["base"]), [_state(family[f"expert{i}"]) for i in range(3)]
    dens, ws = [0.3, 0.5, 0.4], [1.0, 0.5, 1.0]
    merged = {n: plain_ties(b, [x[n] for x in xs], dens, ws) for n, b in base.items()}
    got = load_output(out)
    assert set(got) == set(merged)
    for n in merged:
        assert torch.allclose(got[n], merged[n], atol=1e-6), n
    ids = torch.tensor([[1, 5, 9, 13, 40, 77]])
    ours = logits_of(out, out, ids)
    theirs = logits_of(merged, family["base"], ids)
    assert torch.allclose(ours, theirs, atol=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["num_hidden_layers"] == 4
    report = json.loads((out / "merge_report.json").read_text())
    q = next(t for t in report["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    n = merged["model.layers.0.self_attn.q_proj.weight"].numel()
    assert q["kept_fraction"] == pytest.approx([int(d * n) / n for d in dens], abs=1e-6)
    assert q["task_vector_norms"][0] == pytest.approx(
        float((xs[0][q["name"]] - base[q["name"]]).norm()), rel=1e-5
    )
    assert 0.0 <= q["sign_conflict_rate"] <= 1.0


def test_linear_bf16_output_and_card(tmp_path, family_bf16):
    recipe = write_recipe(
        tmp_path / "lin.yaml",
        f"name: soup\nmodels:\n  - model: {family_bf16['expert0']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {family_bf16['expert1']}\n    parameters: {{weight: 3}}\nmethod: linear\n",
    )
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet")
    assert r.exit_code == 0, r.stderr
    a, b = _state(family_bf16["expert0"]), _state(family_bf16["expert1"])
    got = load_output(out)
    for n in a:
        want = ((a[n].float() + 3 * b[n].float()) / 4).to(torch.bfloat16)
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want), n
    card = (out / "README.md").read_text()
    # issue 7: base_model lists hub ids only (the hub rejects local paths there); these sources are local
    front = card.split("---")[1]
    assert card.startswith("---\n") and "base_model" not in front and "- merge-cli\n" in front
    assert "library_name: transformers" in front and str(family_bf16["expert1"]) in card
    assert "Wortsman et al. 2022" in card and "method: linear" in card
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(logits_of(out, out, ids)).all()


def test_passthrough_slices_output_loads_with_rewritten_layer_count(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "pt.yaml",
        f"base_model: {family['base']}\nmethod: passthrough\nslices:\n"
        f"  - sources: [{{model: {family['expert0']}, layers: [0, 3]}}]\n"
        f"  - sources: [{{model: {family['expert1']}, layers: [1, 4]}}]\n",
    )
    out = tmp_path / "out"
    assert run_cli("run", recipe, out, "--quiet").exit_code == 0
    got, e0, e1 = load_output(out), _state(family["expert0"]), _state(family["expert1"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"], e1["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(
        got["model.layers.2.self_attn.q_proj.weight"], e0["model.layers.2.self_attn.q_proj.weight"]
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6


def test_overwrite_refused_then_allowed(tmp_path, family):
    recipe = write_recipe(tmp_path / "r.yaml", f"models: [{family['expert0']}]\nmethod: passthrough\n")
    out = tmp_path / "out"
    assert run_cli("run", recipe, out, "-q").exit_code == 0
    r = run_cli("run", recipe, out, "-q")
    assert (
        r.exit_code == 2
        and r.stderr.strip() == f"error: output {out} already exists; pass --overwrite to replace it"
    )
    assert run_cli("run", recipe, out, "-q", "--overwrite").exit_code == 0


def test_plan_json_and_inspect(tmp_path, family):
    recipe = write_recipe(
        tmp_path / "r.yaml", f"base_model: {family['base']}\nmodels: [{family['expert0']}]\nmethod: ties\n"
    )
    r = run_cli("plan", recipe, "--json")
    assert r.exit_code == 0
    plan = json.loads(r.stdout)
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert plan["tensors"] == 39 and plan["jobs"][-1]["name"] == "model.norm.weight"
    assert jobs["model.embed_tokens.weight"]["params"]["density"] == [0.2]
    r = run_cli("plan", recipe)
    assert r.exit_code == 0 and "Tensors by module group" in r.stdout
    r = run_cli("inspect", family["expert2"], "--json")
    info = json.loads(r.stdout)
    assert (
        info["layers"] == 4
        and info["tensors"] == 39
        and info["tied_embeddings"] is False
        and len(info["files"]) == 2
    )
    r = run_cli("methods", "ties")
    assert r.exit_code == 0 and "arXiv:2306.01708" in r.stdout and "density" in r.stdout
    r = run_cli("methods", "tie")
    assert r.exit_code == 2
