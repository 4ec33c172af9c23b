"""Issue 6.3: `merge-cli verify OUT_DIR` passes a finished merge and names every problem in a damaged one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli
from rel_helpers import small_family
from safetensors.torch import save_file

from merge_cli.io import writer as writer_mod
from merge_cli.output.verify import verify_folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    fam = small_family(tmp_path_factory.mktemp("small"))
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_cli("run", fam["recipe"], out, "-q")
    assert res.exit_code == 0, res.stderr
    return out


def test_verify_accepts_a_finished_merge(reference):
    res = run_cli("verify", reference)
    files = len([p for p in reference.iterdir() if p.name != "manifest.json"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == (
        f"ok: {reference}: {files} file(s) match the manifest; 30 tensor(s) agree with the index and config"
    )


def rewrite_manifest(out) -> None:
    """What a writer would have recorded for the folder as it is now (to test the checks after the manifest)."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.name != "manifest.json":
            files[p.name] = dict(zip(("sha256", "size"), writer_mod.file_digest(p), strict=True))
    (out / "manifest.json").write_text(json.dumps({"files": files}))


def copy_of(reference, tmp_path):
    return shutil.copytree(reference, tmp_path / "copy")


def verify_error(out) -> str:
    res = run_cli("verify", out)
    assert res.exit_code == 2, res.stdout
    return res.stderr.strip()


def test_verify_detects_a_changed_shard(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    f = out / "model-00003-of-00025.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert verify_error(out) == (
        f"error: {out}: verification failed: model-00003-of-00025.safetensors: sha256 differs from the manifest "
        "(the file changed or is damaged)"
    )


def test_verify_detects_missing_extra_and_truncated_files(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    listed = json.loads((out / "manifest.json").read_text())["files"]["model-00002-of-00025.safetensors"][
        "size"
    ]
    (out / "README.md").unlink()
    (out / "stray.txt").write_text("x")
    with open(out / "model-00002-of-00025.safetensors", "r+b") as f:
        f.truncate(100)
    assert verify_error(out) == (
        f"error: {out}: verification failed: README.md: listed in the manifest but missing (and 3 more problem(s))"
    )
    assert verify_folder(out).problems == [
        "README.md: listed in the manifest but missing",
        f"model-00002-of-00025.safetensors: size 100 but the manifest says {listed}",
        "stray.txt: present but not in the manifest",
        f"{out}/model-00002-of-00025.safetensors: truncated: header length 128 runs past the end of the 100-byte "
        "file; re-download or re-save the file",
    ]


def test_verify_without_manifest(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    (out / "manifest.json").unlink()
    assert verify_error(out) == (
        f"error: {out}: verification failed: manifest.json is missing: the folder was not completed by merge-cli"
    )


def test_verify_index_against_shards(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    shared = next(
        n for n, f in wm.items() if list(wm.values()).count(f) > 1
    )  # a tensor whose shard holds others
    right, wrong = wm[shared], next(f for f in wm.values() if f != wm[shared])
    wm[shared] = wrong
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    rewrite_manifest(out)
    assert verify_folder(out).problems == [
        f"{right}: tensor '{shared}' is not indexed to this shard",
        f"model.safetensors.index.json: tensor '{shared}' is mapped to {wrong} but that shard does not hold it",
    ]
    assert verify_error(out) == (
        f"error: {out}: verification failed: {right}: tensor '{shared}' is not indexed to this shard "
        "(and 1 more problem(s))"
    )


def test_verify_shapes_against_config(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(vocab_size=33, num_hidden_layers=4)
    (out / "config.json").write_text(json.dumps(cfg))
    rewrite_manifest(out)
    assert verify_error(out) == (
        f"error: {out}: verification failed: config.json: num_hidden_layers is 4 but the shards hold layers 0..2 (3) "
        "(and 2 more problem(s))"
    )


def test_verify_finds_nonfinite_tensors(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf")])}, str(out / "model.safetensors"))
    rewrite_manifest(out)
    assert verify_error(out) == (
        f"error: {out}: verification failed: tensor 'w' (model.safetensors) holds 1 NaN and 1 Inf value(s) out of 3"
    )
    assert run_cli("verify", out, "--no-finite").exit_code == 0
