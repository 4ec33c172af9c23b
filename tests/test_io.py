"""Checkpoint reading (headers, lazy reads, sharded index) and the streaming sharded writer."""

import json

import pytest
import torch
from helpers import write_model
from safetensors import safe_open
from safetensors.torch import load_file

from merge_cli.errors import CheckpointError, OutputError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import SafetensorsFile
from merge_cli.io.writer import ShardedWriter, check_output, temp_dir_for

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "c.scalar": torch.tensor(3.0, dtype=torch.float16),
    "d.ids": torch.arange(5, dtype=torch.int64),
    "e.flag": torch.tensor([True, False, True]),
}


def test_reader_matches_safetensors_library(tmp_path):
    folder = write_model(tmp_path / "m", TENSORS)
    ck = Checkpoint(folder)
    assert set(ck.tensors) == set(TENSORS)
    for name, t in TENSORS.items():
        got = ck.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    assert torch.equal(ck.read_rows("a.weight", 1, 3), TENSORS["a.weight"][1:3])
    assert ck.info("b.bias").dtype == "BF16" and ck.info("a.weight").nbytes == 48
    ck.close()


def test_sharded_checkpoint_through_index(tmp_path):
    folder = write_model(tmp_path / "m", TENSORS, shards=3)
    ck = Checkpoint(folder)
    assert len(ck.files) == 3 and set(ck.tensors) == set(TENSORS)
    assert torch.equal(ck.read("d.ids"), TENSORS["d.ids"])


def test_single_file_checkpoint(tmp_path):
    folder = write_model(tmp_path / "m", TENSORS)
    ck = Checkpoint(folder / "model.safetensors")
    assert ck.folder is None and torch.equal(ck.read("a.weight"), TENSORS["a.weight"])


def test_bad_headers_give_one_clear_error(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(f)
    assert str(e.value) == (
        f"{f}: not a safetensors file (2 bytes, shorter than the 8-byte header length); re-download or re-save the file"
    )
    good = write_model(tmp_path / "m", {"w": torch.zeros(4)}) / "model.safetensors"
    data = good.read_bytes()
    f.write_bytes(data[:-4])  # truncated
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(f)
    assert str(e.value) == (
        f"{f}: truncated: tensor 'w' ends at byte 16 but the data section holds 12; re-download or re-save the file"
    )


def test_index_escaping_folder_is_refused(tmp_path):
    folder = write_model(tmp_path / "m", {"w": torch.zeros(2)})
    (tmp_path / "evil.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError) as e:
        Checkpoint(folder)
    assert (
        str(e.value)
        == f"{index}: weight_map names file '../evil.safetensors' outside the model folder; refusing it"
    )


def _shards(tensors, per_shard):
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    n = len(groups)
    return [
        (
            f"model-{k + 1:05d}-of-{n:05d}.safetensors",
            [
                (
                    nm,
                    {
                        torch.float32: "F32",
                        torch.bfloat16: "BF16",
                        torch.float16: "F16",
                        torch.int64: "I64",
                        torch.bool: "BOOL",
                    }[tensors[nm].dtype],
                    tuple(tensors[nm].shape),
                    tensors[nm].numel() * tensors[nm].element_size(),
                )
                for nm in g
            ],
        )  # fmt: skip
        for k, g in enumerate(groups)
    ]


def test_writer_round_trip_shards_index_and_atomic_rename(tmp_path):
    out = tmp_path / "out"
    shards = _shards(TENSORS, 2)
    w = ShardedWriter(out, shards)
    assert temp_dir_for(out).is_dir() and not out.exists()
    for name, t in TENSORS.items():
        w.write(name, t)
        assert not out.exists()  # nothing appears before finish()
    w.write_index({"merged_by": "test"})
    w.finish(overwrite=False)
    assert out.is_dir() and not temp_dir_for(out).exists()
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a.weight": files[0],
        "b.bias": files[0],
        "c.scalar": files[1],
        "d.ids": files[1],
        "e.flag": files[2],
    }
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for f in files:  # every shard holds exactly what the index says, read by the safetensors library
        with safe_open(str(out / f), "pt") as sf:
            assert sorted(sf.keys()) == sorted(k for k, v in index["weight_map"].items() if v == f)
    loaded = {}
    for f in files:
        loaded.update(load_file(str(out / f)))
    for name, t in TENSORS.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) | {"model.safetensors.index.json"}
    import hashlib

    assert manifest["files"][files[0]]["sha256"] == hashlib.sha256((out / files[0]).read_bytes()).hexdigest()


def test_writer_rejects_off_plan_tensor(tmp_path):
    w = ShardedWriter(tmp_path / "out", _shards(TENSORS, 5))
    with pytest.raises(RuntimeError):
        w.write("b.bias", TENSORS["b.bias"])
    w.abort()
    assert not temp_dir_for(tmp_path / "out").exists() and not (tmp_path / "out").exists()


def test_output_checks(tmp_path):
    model = write_model(tmp_path / "m", {"w": torch.zeros(2)})
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputError) as e:
        check_output(existing, [model], overwrite=False)
    assert str(e.value) == f"output {existing} already exists; pass --overwrite to replace it"
    check_output(existing, [model], overwrite=True)
    inside = model / "merged"
    with pytest.raises(OutputError) as e:
        check_output(inside, [model], overwrite=False)
    assert (
        str(e.value) == f"output {inside} is inside input model {model}; choose a folder outside every input"
    )
