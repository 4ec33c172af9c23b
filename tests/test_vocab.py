"""Vocabulary size differences (crop / pad_from_base / error) and tied embeddings."""

from __future__ import annotations

import json

import torch
from helpers import load_output, run_cli, write_model, write_recipe

H = 16


def _model(folder, vocab: int, seed: int, tied: bool = False):
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(vocab, H, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, H, generator=g),
        "model.norm.weight": torch.randn(H, generator=g),
    }
    if not tied:
        t["lm_head.weight"] = torch.randn(vocab, H, generator=g)
    cfg = {"model_type": "llama", "vocab_size": vocab, "num_hidden_layers": 1, "tie_word_embeddings": tied}
    write_model(folder, t, cfg)
    return t


def _run(tmp_path, recipe: dict):
    path = write_recipe(tmp_path / "r.yaml", recipe)
    return run_cli("run", path, tmp_path / "out", "-q")


def test_default_is_an_error_naming_the_options(tmp_path):
    _model(tmp_path / "a", 10, 1)
    _model(tmp_path / "b", 12, 2)
    r = _run(tmp_path, {"method": "linear", "models": [str(tmp_path / "a"), str(tmp_path / "b")]})
    assert r.exit_code == 2
    assert "'a' 10, 'b' 12" in r.stderr and "vocab: crop" in r.stderr and "vocab: pad_from_base" in r.stderr


def test_crop_keeps_common_rows_and_updates_config(tmp_path):
    big = _model(tmp_path / "big", 12, 1)
    small = _model(tmp_path / "small", 10, 2)
    r = _run(
        tmp_path,
        {"method": "linear", "vocab": "crop", "models": [str(tmp_path / "big"), str(tmp_path / "small")]},
    )
    assert r.exit_code == 0, r.stderr
    out = load_output(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = 0.5 * big[name][:10] + 0.5 * small[name]
        assert out[name].shape == (10, H) and torch.allclose(out[name], want, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 10
    report = (tmp_path / "out" / "merge_report.md").read_text()
    assert "'big' cropped from 12 to 10 rows" in report


def test_pad_from_base_takes_missing_rows_from_the_base(tmp_path):
    base = _model(tmp_path / "base", 12, 1)
    tuned = _model(tmp_path / "tuned", 10, 2)
    r = _run(
        tmp_path,
        {
            "method": "task_arithmetic",
            "vocab": "pad_from_base",
            "base_model": str(tmp_path / "base"),
            "models": [str(tmp_path / "tuned")],
            "parameters": {"lambda": 0.5},
        },
    )
    assert r.exit_code == 0, r.stderr
    out = load_output(tmp_path / "out")
    e = "model.embed_tokens.weight"
    assert out[e].shape == (12, H)
    assert torch.allclose(out[e][:10], base[e][:10] + 0.5 * (tuned[e] - base[e][:10]), atol=1e-6)
    assert torch.equal(out[e][10:], base[e][10:])  # padded rows carry no task vector
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 12
    assert "'tuned' padded from 10 to 12 rows" in (tmp_path / "out" / "merge_report.md").read_text()


def test_tied_reference_stays_tied(tmp_path):
    base = _model(tmp_path / "base", 10, 1, tied=True)
    tuned = _model(tmp_path / "tuned", 10, 2, tied=False)
    r = _run(tmp_path, {"method": "linear", "models": [str(tmp_path / "base"), str(tmp_path / "tuned")]})
    assert r.exit_code == 0, r.stderr
    out = load_output(tmp_path / "out")
    assert "lm_head.weight" not in out
    e = "model.embed_tokens.weight"
    assert torch.allclose(out[e], 0.5 * base[e] + 0.5 * tuned[e], atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "keeps tied embeddings" in (tmp_path / "out" / "merge_report.md").read_text()


def test_untied_reference_reads_a_tied_sources_embedding_as_its_head(tmp_path):
    base = _model(tmp_path / "base", 10, 1, tied=False)
    tuned = _model(tmp_path / "tuned", 10, 2, tied=True)
    r = _run(tmp_path, {"method": "linear", "models": [str(tmp_path / "base"), str(tmp_path / "tuned")]})
    assert r.exit_code == 0, r.stderr
    out = load_output(tmp_path / "out")
    want = 0.5 * base["lm_head.weight"] + 0.5 * tuned["model.embed_tokens.weight"]
    assert torch.allclose(out["lm_head.weight"], want, atol=1e-6)
    assert "'tuned' has tied embeddings" in (tmp_path / "out" / "merge_report.md").read_text()


def test_unknown_vocab_mode_names_the_choices(tmp_path):
    _model(tmp_path / "a", 10, 1)
    r = _run(tmp_path, {"method": "linear", "vocab": "union", "models": [str(tmp_path / "a")]})
    assert r.exit_code == 2 and "'crop'" in r.stderr and "'pad_from_base'" in r.stderr
