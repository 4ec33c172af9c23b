"""recipe.lock.yaml: written by every run and by `merge-cli lock`; `run --locked` rebuilds the same bits
or refuses."""

from __future__ import annotations

import json
import shutil

import torch
import yaml
from helpers import fine_tune_like, load_output, run_cli, save_hf, write_recipe
from hubcache import add_to_cache
from safetensors.torch import load_file

RECIPE = {"method": "ties", "parameters": {"density": 0.5}}


def _copy_family(family, tmp_path):
    for n in ("base", "expert0", "expert2"):
        shutil.copytree(family[n], tmp_path / n)
    return write_recipe(
        tmp_path / "r.yaml", {**RECIPE, "base_model": "./base", "models": ["./expert0", "./expert2"]}
    )


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_lock_command_matches_run_and_locked_rebuild_is_bitwise(family, tmp_path):
    recipe = _copy_family(family, tmp_path)
    assert run_cli("run", recipe, tmp_path / "out1", "-q").exit_code == 0
    run_lock = yaml.safe_load((tmp_path / "out1" / "recipe.lock.yaml").read_text())
    r = run_cli("lock", recipe)
    assert r.exit_code == 0, r.stderr
    cmd_lock = yaml.safe_load((tmp_path / "r.lock.yaml").read_text())
    assert {k: v for k, v in run_lock.items() if k != "output"} == cmd_lock
    assert set(cmd_lock["models"][2]["files"]) == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    r = run_cli("run", recipe, tmp_path / "out2", "-q", "--locked", tmp_path / "out1" / "recipe.lock.yaml")
    assert r.exit_code == 0, r.stderr
    assert "bitwise identical" in r.stdout
    assert _shards(tmp_path / "out1") == _shards(tmp_path / "out2")


def test_locked_run_refuses_changed_inputs(family, tmp_path):
    recipe = _copy_family(family, tmp_path)
    assert run_cli("lock", recipe).exit_code == 0
    lock = tmp_path / "r.lock.yaml"
    r = run_cli("run", recipe, tmp_path / "out", "-q", "--locked", lock, "--seed", "5")
    assert r.exit_code == 2 and "seed: locked 0, now 5" in r.stderr
    sd = load_file(str(tmp_path / "expert0" / "model.safetensors"))
    sd["model.norm.weight"] = sd["model.norm.weight"] + 1e-3
    save_hf(
        tmp_path / "expert0",
        sd,
        json.loads((tmp_path / "base" / "config.json").read_text()),
        dtype=torch.float32,
    )
    r = run_cli("run", recipe, tmp_path / "out", "-q", "--locked", lock)
    assert r.exit_code == 2
    assert "models.1.files.model.safetensors" in r.stderr and "refusing to run" in r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("0.5", "0.6"))
    r = run_cli("run", recipe, tmp_path / "out", "-q", "--locked", lock)
    assert r.exit_code == 2 and "recipe_sha256" in r.stderr


def test_locked_hub_run_uses_locked_commit_after_branch_moves(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(tmp_path / "cache", "org/base", family["base"])
    add_to_cache(tmp_path / "cache", "org/tuned", family["expert0"])
    recipe = write_recipe(tmp_path / "r.yaml", {**RECIPE, "base_model": "org/base", "models": ["org/tuned"]})
    assert run_cli("run", recipe, tmp_path / "out1", "-q").exit_code == 0
    # the branch moves on: a new commit of org/tuned becomes main
    cfg = json.loads((family["base"] / "config.json").read_text())
    moved = fine_tune_like(
        load_file(str(family["expert0"] / "model.safetensors")), torch.Generator().manual_seed(9)
    )
    save_hf(tmp_path / "newer", moved, cfg, dtype=torch.float32)
    add_to_cache(tmp_path / "cache", "org/tuned", tmp_path / "newer")
    assert run_cli("run", recipe, tmp_path / "out_main", "-q").exit_code == 0
    r = run_cli("run", recipe, tmp_path / "out2", "-q", "--locked", tmp_path / "out1" / "recipe.lock.yaml")
    assert r.exit_code == 0, r.stderr
    assert _shards(tmp_path / "out1") == _shards(tmp_path / "out2")
    a, b = load_output(tmp_path / "out1"), load_output(tmp_path / "out_main")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # without the lock, main's new commit is used


def test_sha256_cache_follows_content_and_trusts_hub_blob_names(tmp_path):
    import hashlib
    import os

    from merge_cli.io.lock import sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()  # second time from the cache
    f.write_bytes(b"abcd")
    os.utime(f, ns=(1, 2))
    assert sha256_file(f) == hashlib.sha256(b"abcd").hexdigest()
    blob = tmp_path / "blobs" / ("a" * 64)
    blob.parent.mkdir()
    blob.write_bytes(b"whatever")
    assert sha256_file(blob) == "a" * 64
