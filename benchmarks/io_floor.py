"""The I/O floor of a merge: read every tensor of every input, write one checkpoint of the base's size.

No arithmetic at all: each tensor is read (one at a time, with ``safetensors.safe_open``, copied into
process memory so that every byte is really read) from every input checkpoint, the base's copy is kept for the output, and output shards are written with
``safetensors.torch.save_file`` as soon as they fill up. A merge tool cannot be faster than this with the
same reads and writes, so ``tool time / floor`` is the overhead of its arithmetic and bookkeeping.

    python benchmarks/io_floor.py OUT BASE_DIR OTHER_DIR... [--shard-size 5e9] [--fsync]

merge-cli flushes every output shard to the disk before it reports the merge done (fsync); the floor by
default leaves its output in the page cache (the benchmark's os.sync() after each run is outside the timed
region). `--fsync` makes the floor flush too: the fair floor where writing, not reading, is the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file of an HF model folder (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def io_floor(out: Path, inputs: list[Path], shard_size: int = 5 * 1000**3, fsync: bool = False) -> float:
    """Read all tensors of ``inputs`` (base first), write the base-sized output into ``out``; wall seconds.
    fsync: each shard is flushed to the disk once written (as merge-cli does), not left in the page cache."""
    t0 = time.perf_counter()
    maps = [tensor_files(d) for d in inputs]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shard: dict = {}
    size = 0
    n_shards = 0
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, size, n_shards
        n_shards += 1
        name = f"model-{n_shards:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        if fsync:
            _fsync(out / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, base_file in maps[0].items():
        kept = None
        for k, m in enumerate(maps):
            with safe_open(str(m[name] if k else base_file), framework="pt") as h:
                # get_tensor may return a zero-copy view of the mmapped file; clone() really reads the bytes.
                t = h.get_tensor(name).clone()
            if k == 0:
                kept = t
            del t
        nbytes = kept.numel() * kept.element_size()
        if shard and size + nbytes > shard_size:
            flush()
        shard[name] = kept
        size += nbytes
    if shard:
        flush()
    index = {"metadata": {"total_size": sum(f.stat().st_size for f in out.glob("*.safetensors"))}}
    index["weight_map"] = weight_map
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.copy(inputs[0] / "config.json", out / "config.json")
    if fsync:
        _fsync(out)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (replaced)")
    ap.add_argument("inputs", type=Path, nargs="+", help="model folders, base first")
    ap.add_argument("--shard-size", type=float, default=5e9, help="output shard size in bytes (default 5e9)")
    ap.add_argument(
        "--fsync",
        action="store_true",
        help="flush each shard to the disk (as merge-cli does) before going on",
    )
    args = ap.parse_args(argv)
    wall = io_floor(args.out, args.inputs, int(args.shard_size), args.fsync)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"wall_s": round(wall, 3), "peak_rss_gb": round(peak_gb, 3)}))
    print(f"io floor: {wall:.2f} s, peak RSS {peak_gb:.2f} GB", file=sys.stderr)


if __name__ == "__main__":
    main()
