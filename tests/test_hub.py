"""Hub references: offline from a hand-built cache, and 'online' against a fake hub that records calls."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from helpers import load_output, run_cli, write_model, write_recipe
from hubcache import _etag, add_to_cache

from merge_cli.io.hub import parse_hub_ref
from merge_cli.io.refs import hub_ref_of

TA = {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, family):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "hf" / "hub"
    commits = {
        n: add_to_cache(cache, f"org/{n}", family[n], refs=("main", "v1"))
        for n in ("base", "expert0", "expert2")
    }
    return cache, commits


def test_parse_refs(tmp_path):
    assert parse_hub_ref("org/name") == huggingface_hub_ref("org/name", "main")
    assert parse_hub_ref("org/name@v1.0") == huggingface_hub_ref("org/name", "v1.0")
    assert parse_hub_ref("org/my.model-7B@refs/pr/3").revision == "refs/pr/3"
    for bad in ("name", "a/b/c", "org/../x", "/abs/path", "org/name@"):
        assert parse_hub_ref(bad) is None, bad
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_ref_of("org/name", tmp_path) is None  # an existing local folder wins
    assert hub_ref_of("./org/other", tmp_path) is None


def huggingface_hub_ref(repo, rev):
    from merge_cli.io.hub import HubRef

    return HubRef(repo, rev)


def test_offline_hub_merge_equals_local_merge(offline_hub, family, tmp_path):
    cache, commits = offline_hub
    hub = write_recipe(
        tmp_path / "hub.yaml",
        {**TA, "base_model": "org/base", "models": ["org/expert0@v1", f"org/expert2@{commits['expert2']}"]},
    )
    local = write_recipe(
        tmp_path / "local.yaml",
        {**TA, "base_model": str(family["base"]), "models": [str(family["expert0"]), str(family["expert2"])]},
    )
    r = run_cli("run", hub, tmp_path / "out_hub", "-q")
    assert r.exit_code == 0, r.output
    assert run_cli("run", local, tmp_path / "out_local", "-q").exit_code == 0
    a, b = load_output(tmp_path / "out_hub"), load_output(tmp_path / "out_local")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lock = (tmp_path / "out_hub" / "recipe.lock.yaml").read_text()
    for name, commit in commits.items():
        assert commit in lock, name
    card = (tmp_path / "out_hub" / "README.md").read_text()
    assert "- org/base" in card and "- org/expert2" in card  # base_model front matter
    assert {r.repo_id for r in huggingface_hub.scan_cache_dir(cache).repos} == {
        "org/base",
        "org/expert0",
        "org/expert2",
    }


def test_offline_missing_revision_is_one_line(offline_hub, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", {**TA, "base_model": "org/base", "models": ["org/expert0@nope"]}
    )
    r = run_cli("plan", recipe)
    assert r.exit_code == 2
    assert "revision 'nope' is not in the local hub cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


# -- a fake hub: metadata calls answered from local folders, downloads recorded ------------------


class FakeHub:
    def __init__(self, cache: Path, repos: dict[str, Path], license: str | None = "apache-2.0"):
        self.cache, self.repos, self.license = cache, repos, license
        self.calls: list[tuple[str, str, str]] = []
        self.commit = {r: f"{i + 1:040x}" for i, r in enumerate(repos)}

    def model_info(self, _api, repo_id, revision=None, files_metadata=False, **kw):
        self.calls.append(("model_info", repo_id, ""))
        folder = self.repos[repo_id]
        siblings = [
            SimpleNamespace(
                rfilename=p.name,
                lfs=SimpleNamespace(sha256=_etag(p)) if p.suffix in (".safetensors", ".bin") else None,
            )
            for p in sorted(folder.iterdir())
        ]
        card = SimpleNamespace(to_dict=lambda: {"license": self.license}) if self.license else None
        return SimpleNamespace(sha=self.commit[repo_id], siblings=siblings, card_data=card)

    def parse_header(self, _api, repo_id, filename, revision=None, **kw):
        self.calls.append(("header", repo_id, filename))
        with open(self.repos[repo_id] / filename, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        tensors = {
            k: SimpleNamespace(dtype=v["dtype"], shape=v["shape"], data_offsets=v["data_offsets"])
            for k, v in header.items()
        }
        return SimpleNamespace(tensors=tensors)

    def download(self, repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kw):
        self.calls.append(("download", repo_id, filename))
        assert not local_files_only and revision == self.commit[repo_id]
        tmp = Path(cache_dir) / "incoming" / filename
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.repos[repo_id] / filename, tmp)
        add_to_cache(cache_dir, repo_id, tmp.parent, refs=(), commit=self.commit[repo_id])
        shutil.rmtree(tmp.parent)
        return str(
            Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision / filename
        )

    def weights_downloaded(self) -> list[str]:
        return [
            f"{r}/{f}"
            for kind, r, f in self.calls
            if kind == "download" and f.endswith((".safetensors", ".bin"))
        ]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, family):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.chdir(tmp_path)
    repos = {}
    for n in ("base", "expert0", "expert2"):
        repos[f"org/{n}"] = tmp_path / "remote" / n
        shutil.copytree(family[n], repos[f"org/{n}"])
    (repos["org/base"] / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # never needed
    big = {"model.embed_tokens.weight": torch.zeros(130, 64), "model.norm.weight": torch.ones(64)}
    repos["org/bigvocab"] = write_model(tmp_path / "remote" / "bigvocab", big, {"model_type": "llama"})
    hub = FakeHub(tmp_path / "cache", repos)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: hub.model_info(*a, **k))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "parse_safetensors_file_metadata", lambda *a, **k: hub.parse_header(*a, **k)
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub


def test_plan_reads_metadata_only_and_run_fetches_needed_files(fake_hub, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml", {**TA, "base_model": "org/base", "models": ["org/expert0", "org/expert2"]}
    )
    r = run_cli("plan", recipe)
    assert r.exit_code == 0, r.stderr
    assert fake_hub.weights_downloaded() == []
    assert ("header", "org/expert2", "model-00002-of-00002.safetensors") in fake_hub.calls
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(fake_hub.weights_downloaded()) == [
        "org/base/model.safetensors",
        "org/expert0/model.safetensors",
        "org/expert2/model-00001-of-00002.safetensors",
        "org/expert2/model-00002-of-00002.safetensors",
    ]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: apache-2.0" in card  # every source agrees


def test_mistakes_fail_before_any_weight_moves(fake_hub, tmp_path):
    typo = write_recipe(
        tmp_path / "t.yaml",
        {**TA, "method": "task_arithmetc", "base_model": "org/base", "models": ["org/expert0"]},
    )
    r = run_cli("run", typo, tmp_path / "out", "-q")
    assert r.exit_code == 2 and "did you mean 'task_arithmetic'" in r.stderr
    assert fake_hub.calls == []
    vocab = write_recipe(tmp_path / "v.yaml", {**TA, "base_model": "org/base", "models": ["org/bigvocab"]})
    r = run_cli("run", vocab, tmp_path / "out", "-q")
    assert r.exit_code == 2 and "vocab: crop" in r.stderr
    assert fake_hub.weights_downloaded() == [] and not os.path.exists(tmp_path / "out")


def test_lock_without_download_uses_hub_hashes(fake_hub, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TA, "base_model": "org/base", "models": ["org/expert0"]})
    r = run_cli("lock", recipe)
    assert r.exit_code == 0, r.stderr
    assert fake_hub.weights_downloaded() == []
    lock = (tmp_path / "r.lock.yaml").read_text()
    assert _etag(fake_hub.repos["org/expert0"] / "model.safetensors") in lock
    assert fake_hub.commit["org/expert0"] in lock
    r = run_cli("run", recipe, tmp_path / "out", "-q", "--locked", tmp_path / "r.lock.yaml")
    assert r.exit_code == 0, r.stderr


def test_hub_base_plus_hub_adapter_offline(offline_hub, family, tmp_path):
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.self_attn.q_proj"
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    folder = tmp_path / "adapter_src"
    folder.mkdir()
    save_file(
        {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_rslora": True})
    )
    add_to_cache(offline_hub[0], "org/adapter", folder)
    recipe = write_recipe(tmp_path / "r.yaml", {"method": "passthrough", "models": ["org/base+org/adapter"]})
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    w = load_file(str(family["base"] / "model.safetensors"))[name + ".weight"]
    want = w + (2 / 2**0.5) * b @ a  # rsLoRA: alpha / sqrt(r)
    assert torch.allclose(load_output(tmp_path / "out")[name + ".weight"], want, atol=1e-5)
    lock = (tmp_path / "out" / "recipe.lock.yaml").read_text()
    assert "adapter_config.json" in lock and "repo: org/adapter" in lock


def test_slices_download_only_the_shards_they_read(fake_hub, tmp_path):
    # expert2 is sharded: shard 1 holds the embeddings and layers 0-1, shard 2 layers 2-3 and the head
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "method": "passthrough",
            "base_model": "org/base",
            "slices": [{"sources": [{"model": "org/expert2", "layers": [0, 2]}]}],
        },
    )
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(fake_hub.weights_downloaded()) == [
        "org/base/model.safetensors",
        "org/expert2/model-00001-of-00002.safetensors",
    ]


def test_a_missing_cached_file_is_worded_as_cache_miss_not_as_a_missing_file(monkeypatch):
    """LocalEntryNotFoundError subclasses EntryNotFoundError: it must still read as "not in the local cache",
    with the reason (offline, or the hub unreachable), not as "has no file"."""
    from huggingface_hub import errors as he

    from merge_cli.io.hub import _hub_error, parse_hub_ref

    ref = parse_hub_ref("org/name@main")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = str(_hub_error(ref, he.LocalEntryNotFoundError("x"), "config.json"))
    assert "config.json is not in the local cache" in msg and "HF_HUB_OFFLINE is set" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    msg = str(_hub_error(ref, he.LocalEntryNotFoundError("x"), "config.json"))
    assert "the hub could not be reached" in msg and "has no file" not in msg
    assert "has no file config.json" in str(_hub_error(ref, he.EntryNotFoundError("x"), "config.json"))
