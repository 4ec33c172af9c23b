"""`merge-cli check`: a sane merge passes against its base; a broken one fails with exit code 3."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from helpers import run_cli, write_recipe
from hubcache import add_to_cache
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")


@pytest.fixture
def one_thread():
    """Tiny forwards on a shared machine: one intra-op thread avoids spinning threads fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sane_merge_passes_and_broken_merges_fail(family, tmp_path, one_thread, monkeypatch):
    sane = write_recipe(
        tmp_path / "sane.yaml", {"method": "linear", "models": [str(family["base"]), str(family["expert0"])]}
    )
    assert run_cli("run", sane, tmp_path / "sane", "-q").exit_code == 0
    r = run_cli(
        "check", tmp_path / "sane", "--json"
    )  # reference: the recipe's first model, from merge_report.json
    assert r.exit_code == 0, r.stderr

    figures = json.loads(r.stdout)
    assert figures["passed"] and 0.9 < figures["ppl_ratio"] < 1.1
    assert figures["reference"]["model"] == str(family["base"])
    assert len(figures["merged"]["generations"]) == 3

    broken = write_recipe(
        tmp_path / "broken.yaml",
        {
            "method": "task_arithmetic",
            "base_model": str(family["base"]),
            "models": [str(family["expert0"])],
            "parameters": {"lambda": 40.0},
        },
    )
    assert run_cli("run", broken, tmp_path / "broken", "-q").exit_code == 0
    # --against a hub id, resolved through an offline hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_to_cache(tmp_path / "cache", "org/base", family["base"])
    r = run_cli("check", tmp_path / "broken", "--against", "org/base")
    assert r.exit_code == 3 and "x the reference's (limit 1.5)" in r.stderr

    shutil.copytree(tmp_path / "sane", tmp_path / "nan")
    sd = load_file(str(tmp_path / "nan" / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(tmp_path / "nan" / "model.safetensors"))
    r = run_cli("check", tmp_path / "nan", "--max-ppl-ratio", "1000")
    assert r.exit_code == 3 and "NaN or infinite logits" in r.stderr


def test_missing_transformers_is_one_clear_line(family, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    r = run_cli("check", family["base"])
    assert r.exit_code == 2 and "pip install 'merge-cli[check]'" in r.stderr
