"""Issue 6.2: broken or hostile checkpoints give one exact CheckpointError; nothing a checkpoint carries runs."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, llama_state_dict, load_output, run_cli, write_model, write_recipe

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile

HINT = "; re-download or re-save the file"


def raw_file(path: Path, header, data: bytes = b"", hlen: int | None = None) -> Path:
    """A safetensors-like file from a header (dict, or raw bytes) and data bytes, nothing checked."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if hlen is None else hlen) + body + data)
    return path


def err(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    return str(e.value)


T = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def test_valid_raw_file_reads(tmp_path):
    f = raw_file(tmp_path / "ok.safetensors", {"w": T}, struct.pack("<4f", 1, 2, 3, 4))
    assert SafetensorsFile(f).read("w").tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    "header, data, hlen, message",
    [
        (b"", b"", 0, None),  # placeholder replaced below (short file)
        ({"w": T}, b"\0" * 8, None, "truncated: tensor 'w' ends at byte 16 but the data section holds 8"),
        ({"w": T}, b"", 10_000, "truncated: header length 10000 runs past the end of the {size}-byte file"),
        ({"w": T}, b"", MAX_HEADER_BYTES + 1, f"header length {MAX_HEADER_BYTES + 1} is larger than the {MAX_HEADER_BYTES}-byte limit"),
        (b"{not json", b"", None, "malformed header JSON (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        (b"\xff\xfe{}", b"", None, "malformed header JSON (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
        (b"[" * 5000 + b"]" * 5000, b"", None, "malformed header JSON (RecursionError)"),
        (b'{"w": ' + b"9" * 5000 + b"}", b"", None, "malformed header JSON (ValueError)"),
        (b"[1, 2]", b"", None, "header is not a JSON object"),
        ({"__metadata__": [1]}, b"", None, "__metadata__ is not an object"),
        ({"w": [1]}, b"", None, "header entry for 'w' is not an object"),
        ({"w": {**T, "dtype": "F33"}}, b"\0" * 16, None, "tensor 'w' has unsupported dtype 'F33'"),
        ({"w": {**T, "dtype": ["F32"]}}, b"\0" * 16, None, "tensor 'w' has unsupported dtype ['F32']"),
        ({"w": {**T, "shape": [2, -2]}}, b"\0" * 16, None, "tensor 'w' has an invalid shape [2, -2]"),
        ({"w": {**T, "shape": "2x2"}}, b"\0" * 16, None, "tensor 'w' has an invalid shape '2x2'"),
        ({"w": {**T, "data_offsets": [0]}}, b"\0" * 16, None, "tensor 'w' has invalid data_offsets [0]"),
        ({"w": {**T, "data_offsets": [True, 16]}}, b"\0" * 16, None, "tensor 'w' has invalid data_offsets [True, 16]"),
        ({"w": {**T, "data_offsets": [16, 0]}}, b"\0" * 16, None, "tensor 'w' has data_offsets [16, 0] out of order"),
        ({"w": {**T, "data_offsets": [-4, 12]}}, b"\0" * 16, None, "tensor 'w' has data_offsets [-4, 12] out of order"),
        ({"w": {**T, "data_offsets": [8, 24]}}, b"\0" * 16, None, "truncated: tensor 'w' ends at byte 24 but the data section holds 16"),
        ({"w": {**T, "shape": [2, 3]}}, b"\0" * 16, None, "tensor 'w': shape [2, 3] of F32 needs 24 bytes but data_offsets span 16"),
        ({"w": {**T, "dtype": "F16"}}, b"\0" * 16, None, "tensor 'w': shape [2, 2] of F16 needs 8 bytes but data_offsets span 16"),
        (
            {"a": T, "b": {**T, "data_offsets": [8, 24]}},
            b"\0" * 24,
            None,
            "tensors 'a' and 'b' overlap in the data section",
        ),
    ],
    ids=[
        "short", "truncated-data", "header-past-end", "header-too-large", "json-syntax", "json-utf8",
        "json-deep", "json-huge-int", "json-list", "metadata", "entry", "dtype", "dtype-list", "shape-negative",
        "shape-str", "offsets-len", "offsets-bool", "offsets-order", "offsets-negative", "offsets-range",
        "bytes-shape", "bytes-dtype", "overlap",
    ],
)  # fmt: skip
def test_malformed_header(tmp_path, header, data, hlen, message):
    f = tmp_path / "m.safetensors"
    if message is None:
        f.write_bytes(b"\x01\x02\x03")
        message = "not a safetensors file (3 bytes, shorter than the 8-byte header length)"
    else:
        raw_file(f, header, data, hlen)
    message = message.replace("{size}", str(f.stat().st_size))
    assert err(f) == f"{f}: {message}{HINT}"


def test_file_truncated_after_the_header_was_read(tmp_path):
    f = raw_file(tmp_path / "t.safetensors", {"w": T}, b"\0" * 16)
    st = SafetensorsFile(f)
    os.truncate(f, f.stat().st_size - 8)
    with pytest.raises(CheckpointError) as e:
        st.read("w")
    hdr = f.stat().st_size + 8 - 16
    assert str(e.value) == f"{f}: file ended while reading bytes {hdr + 8}..{hdr + 16} (truncated?){HINT}"


# -- index files -------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    sd = llama_state_dict(TINY_CONFIG, torch.Generator().manual_seed(3))
    return write_model(tmp_path / "m", sd, TINY_CONFIG, shards=2)


def set_index(folder: Path, edit) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def ck_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint(folder)
    return str(e.value)


def test_index_dotdot(sharded):
    idx = set_index(sharded, lambda wm: wm.update({"model.norm.weight": "../evil.safetensors"}))
    assert (
        ck_error(sharded)
        == f"{idx}: weight_map names file '../evil.safetensors' outside the model folder; refusing it"
    )


def test_index_absolute_path(sharded):
    idx = set_index(sharded, lambda wm: wm.update({"model.norm.weight": "/etc/passwd"}))
    assert (
        ck_error(sharded)
        == f"{idx}: weight_map names file '/etc/passwd' outside the model folder; refusing it"
    )


def test_index_symlink_escape(sharded, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((sharded / "model-00002-of-00002.safetensors").read_bytes())
    (sharded / "link.safetensors").symlink_to(outside)
    idx = set_index(
        sharded, lambda wm: wm.update({k: "link.safetensors" for k, v in wm.items() if "00002" in v})
    )
    assert (
        ck_error(sharded)
        == f"{idx}: shard 'link.safetensors' is a link that escapes the model folder; refusing it"
    )


def test_index_missing_shard(sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert ck_error(sharded) == (
        f"{sharded}/model.safetensors.index.json: shard 'model-00002-of-00002.safetensors' is missing from {sharded}; "
        "download it again"
    )


def test_index_malformed_json(sharded):
    (sharded / "model.safetensors.index.json").write_text("{")
    assert ck_error(sharded) == (
        f"{sharded}/model.safetensors.index.json: malformed index (JSONDecodeError: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1)); re-download the model"
    )


def test_index_without_weight_map(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    assert ck_error(sharded) == (
        f"{sharded}/model.safetensors.index.json: malformed index (no weight_map object); re-download the model"
    )


def test_index_non_string_file(sharded):
    idx = set_index(sharded, lambda wm: wm.update({"model.norm.weight": ["a"]}))
    assert (
        ck_error(sharded)
        == f"{idx}: weight_map maps 'model.norm.weight' to ['a'], not a file name; re-download the model"
    )


def test_index_names_tensor_its_shard_lacks(sharded):
    idx = set_index(sharded, lambda wm: wm.update({"model.ghost.weight": "model-00001-of-00002.safetensors"}))
    assert ck_error(sharded) == (
        f"{idx}: tensor 'model.ghost.weight' is mapped to model-00001-of-00002.safetensors but that shard does not hold it"
    )


# -- pickles -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """The same tiny model twice: safetensors and pytorch_model.bin (sharded with an index)."""
    root = tmp_path_factory.mktemp("pickled")
    sd = llama_state_dict(TINY_CONFIG, torch.Generator().manual_seed(5))
    base = write_model(
        root / "base", llama_state_dict(TINY_CONFIG, torch.Generator().manual_seed(6)), TINY_CONFIG
    )
    st = write_model(root / "st", sd, TINY_CONFIG)
    pk = root / "pk"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(TINY_CONFIG))
    names = sorted(sd)
    wm = {}
    for k, part in enumerate((names[::2], names[1::2])):
        fname = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, pk / fname)
        wm.update(dict.fromkeys(part, fname))
    (pk / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    single = root / "single"
    single.mkdir()
    torch.save(sd, single / "pytorch_model.bin")
    return {"base": base, "st": st, "pk": pk, "single": single}


def test_pickle_needs_the_flag(tmp_path, pickled):
    r = write_recipe(
        tmp_path / "r.yaml", {"method": "linear", "models": [str(pickled["base"]), str(pickled["single"])]}
    )
    res = run_cli("run", r, tmp_path / "out")
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: model '{pickled['single']}': {pickled['single']} has only pickled PyTorch weights; convert them to "
        "safetensors, or pass --allow-pickle to load them with torch's weights-only loader"
    )


@pytest.mark.parametrize("which", ["pk", "single"])
def test_pickle_with_flag_merges_like_safetensors(tmp_path, pickled, which):
    outs = {}
    for src in ("st", which):
        r = write_recipe(
            tmp_path / f"{src}.yaml",
            {"method": "linear", "models": [str(pickled["base"]), str(pickled[src])]},
        )
        res = run_cli("run", r, tmp_path / src, "-q", "--allow-pickle")
        assert res.exit_code == 0, res.stderr
        outs[src] = load_output(tmp_path / src)
    assert outs["st"].keys() == outs[which].keys()
    assert all(torch.equal(outs["st"][k], outs[which][k]) for k in outs["st"])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, pickled):
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"model.norm.weight": torch.ones(64), "x": _Payload(marker)}, evil / "pytorch_model.bin")
    r = write_recipe(tmp_path / "r.yaml", {"method": "linear", "models": [str(pickled["base"]), str(evil)]})
    res = run_cli("run", r, tmp_path / "out", "--allow-pickle")
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"error: {evil}/pytorch_model.bin: torch's weights-only loader refused the file (UnpicklingError: it "
        "references getattr, which is not plain tensor data); it may be corrupt or carry code, and merge-cli never "
        "runs it; convert it to safetensors with a tool you trust"
    )
    assert not marker.exists()


def test_pickle_holding_other_objects(tmp_path, pickled):
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save({"model.norm.weight": torch.ones(64), "step": 7}, odd / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        Checkpoint(odd, allow_pickle=True)
    assert (
        str(e.value)
        == f"{odd}/pytorch_model.bin: entry 'step' is a int, not a tensor; only flat state dicts are supported"
    )


def test_no_remote_code_anywhere():
    """No trust_remote_code, and every torch.load in the package goes through the weights-only loader."""
    pkg = Path(__file__).parent.parent / "merge_cli"
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        assert "trust_remote_code" not in text, f
        assert not re.search(r"\bpickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(", text), f
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (f, call)


@pytest.mark.parametrize(
    "index, why",
    [
        (
            "[" * 5000 + "]" * 5000,
            "RecursionError: maximum recursion depth exceeded while decoding a JSON array",
        ),
        ('{"weight_map": {"a": ["x"]}}', "TypeError: unhashable type: 'list'"),
        ('{"weight_map": [1]}', "AttributeError: 'list' object has no attribute 'values'"),
    ],
    ids=["deep", "list-value", "list-map"],
)
def test_hostile_hub_index_is_one_line(tmp_path, monkeypatch, family, index, why):
    from hubcache import add_to_cache

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil"
    shutil.copytree(family["expert2"], evil)
    (evil / "model.safetensors.index.json").write_text(index)
    add_to_cache(tmp_path / "hf" / "hub", "org/evil", evil)
    r = write_recipe(tmp_path / "r.yaml", {"method": "linear", "models": [str(family["base"]), "org/evil"]})
    res = run_cli("plan", r)
    assert res.exit_code == 2
    assert res.stderr.startswith(
        f"error: hub model 'org/evil': malformed model.safetensors.index.json ({why}"
    )
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["{", "[" * 5000 + "]" * 5000], ids=["syntax", "deep"])
def test_hostile_tokenizer_config_is_one_line(tmp_path, family, text):
    evil = tmp_path / "evil"
    shutil.copytree(family["expert0"], evil)
    (evil / "tokenizer_config.json").write_text(text)
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "method": "linear",
            "models": [str(family["base"]), str(evil)],
            "chat_template": "auto",
            "donor": "evil",
        },
    )
    res = run_cli("run", r, tmp_path / "out", "-q")
    why = "JSONDecodeError" if text == "{" else "RecursionError"
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        f"error: {evil}/tokenizer_config.json: unreadable tokenizer_config.json ({why}); fix or remove it"
    )
