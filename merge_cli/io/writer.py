"""Sharded safetensors output, written straight to disk as tensors arrive.

The plan fixes every shard's tensors, shapes and dtypes before the first weight is read, so each shard's
header is written first and tensors stream into place: no shard is ever buffered in memory. Everything
goes into a hidden temporary folder beside the target; a manifest (sha256 and size of every file) is
written last, and the folder is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_cli.dtypes import TORCH_TO_ST
from merge_cli.errors import OutputError

MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
JOURNAL = ".resume-journal.jsonl"  # completed shards, for --resume (merge_cli/engine/resume.py); never in the output
# An unfinished shard is made durable (fsync, prefix sha256 journaled) each time this many bytes more are
# written, at a tensor boundary: a killed run then loses at most this much of the shard in flight.
CHECKPOINT_BYTES = int(os.environ.get("MERGE_CLI_TEST_CHECKPOINT_BYTES") or 64 << 20)  # tests lower it


@dataclass
class PartialShard:
    """A shard an interrupted run left unfinished: its first `count` tensors (`end` bytes, header
    included) are verified against the journal, `sha` is the sha256 object of those bytes."""

    filename: str
    count: int
    end: int
    sha: Any


class WriteError(OutputError):
    """Writing the output failed midway (disk full, I/O error): completed shards stay for --resume."""


def write_failed(path: Path, e: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {e.strerror or e} (errno {e.errno}); free space or fix the disk")


def temp_dir_for(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def check_output(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an existing output without overwrite, and any output inside (or containing) an input."""
    out = out_dir.resolve()
    for p in inputs:
        p = p.resolve()
        folder = p if p.is_dir() else p.parent
        if out == folder or folder in out.parents:
            raise OutputError(
                f"output {out_dir} is inside input model {p}; choose a folder outside every input"
            )
        if out in p.parents and out.exists():
            raise OutputError(f"output {out_dir} contains input model {p}; choose another output folder")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out_dir} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder")


def shard_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """safetensors header bytes (length prefix + JSON padded to 8 bytes) for (name, dtype, shape, nbytes) in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _HashingFile:
    """A file written sequentially whose sha256 is computed on a helper thread, beside the writes (hashing
    costs about as much as writing; hashlib releases the GIL, so the two overlap on two cores)."""

    PENDING_CAP = 256 << 20  # bytes written but not yet hashed

    def __init__(self, path: Path, size: int | None = None, resume: PartialShard | None = None):
        self.path = path
        try:
            if resume is None:
                self.f = open(path, "wb")  # noqa: SIM115
            else:  # continue a verified prefix: drop what follows it
                self.f = open(path, "r+b")  # noqa: SIM115
                self.f.truncate(resume.end)
                self.f.seek(resume.end)
            if size:  # reserve the extents up front: the kernel then has no block allocation per write
                os.posix_fallocate(self.f.fileno(), 0, size)
        except OSError as e:
            raise write_failed(path, e) from None
        self.sha = hashlib.sha256() if resume is None else resume.sha
        self.size = 0 if resume is None else resume.end
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._hasher = threading.Thread(target=self._hash_loop, name="merge-cli-hash", daemon=True)
        self._hasher.start()

    def _hash_loop(self) -> None:
        while (mv := self._todo.get()) is not None:
            self.sha.update(mv)
            with self._cond:
                self._pending -= len(mv)
                self._cond.notify_all()

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        try:
            self.f.write(mv)
        except OSError as e:
            raise write_failed(self.path, e) from None
        with self._cond:
            while self._pending and self._pending + len(mv) > self.PENDING_CAP:
                self._cond.wait()
            self._pending += len(mv)
        self._todo.put(mv)  # the view keeps the data alive until hashed
        self.size += len(mv)

    def _stop_hasher(self) -> None:
        self._todo.put(None)
        self._hasher.join()

    def checkpoint(self) -> str:
        """Make everything written so far durable; the sha256 of those bytes (the hasher catches up first)."""
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise write_failed(self.path, e) from None
        with self._cond:
            while self._pending:
                self._cond.wait()
        return self.sha.copy().hexdigest()

    def close(self) -> tuple[str, int]:
        self._stop_hasher()
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            raise write_failed(self.path, e) from None
        return self.sha.hexdigest(), self.size

    def discard(self) -> None:
        """Close and delete an unfinished file."""
        self._stop_hasher()
        try:
            self.f.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


class ShardedWriter:
    """Writes planned shards in order. `shards` is a list of (filename, [(name, dtype, shape, nbytes), ...]).

    `reuse` (resume): shards already complete in the temporary folder, filename -> (sha256, size); they are
    kept and skipped. `partial` (resume): the shard an interrupted run left unfinished, continued after its
    verified tensors. `on_shard_done(filename, sha256, size)` runs after each shard is flushed to disk;
    `on_piece_done(filename, count, end, sha256)` each time an unfinished shard is made durable (every
    CHECKPOINT_BYTES, at a tensor boundary).
    """

    def __init__(
        self,
        out_dir: Path,
        shards: list[tuple[str, list[tuple[str, str, tuple[int, ...], int]]]],
        *,
        reuse: dict[str, tuple[str, int]] | None = None,
        on_shard_done: Callable[[str, str, int], None] | None = None,
        partial: PartialShard | None = None,
        on_piece_done: Callable[[str, int, int, str], None] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.tmp = temp_dir_for(self.out_dir)
        self.shards = shards
        self.digests: dict[str, tuple[str, int]] = dict(reuse or {})
        self.on_shard_done = on_shard_done
        self.partial = partial
        self.on_piece_done = on_piece_done
        self._checkpointed = 0  # bytes of the current shard made durable
        self._has_piece = False  # part of the current shard is journaled (kept by abort(keep=True))
        self.manifest_extra: dict[
            str, Any
        ] = {}  # e.g. the plan fingerprint, so --resume knows a finished run
        self._shard = -1
        self._pos = 0
        self._partial = 0  # bytes of the current tensor written so far (tensors may arrive in row chunks)
        self._file: _HashingFile | None = None
        try:
            if reuse is None and partial is None and self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True, exist_ok=reuse is not None or partial is not None)
        except OSError as e:
            raise write_failed(self.tmp, e) from None

    def _next_shard(self) -> None:
        self._shard += 1
        while self.shards[self._shard][0] in self.digests:  # completed by an earlier, interrupted run
            self._shard += 1
        self._pos = 0
        fname, entries = self.shards[self._shard]
        header = shard_header(entries, {"format": "pt"})
        size = len(header) + sum(e[3] for e in entries)
        if self.partial is not None and self.partial.filename == fname:  # continue after its verified tensors
            self._file = _HashingFile(self.tmp / fname, size, resume=self.partial)
            self._pos = self.partial.count
            self.partial = None
            self._has_piece = True
        else:
            self._file = _HashingFile(self.tmp / fname, size)
            self._file.write(header)
            self._has_piece = False
        self._checkpointed = self._file.size
        if self._pos == len(entries):
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        fname = self.shards[self._shard][0]
        self.digests[fname] = self._file.close()
        self._file = None
        if self.on_shard_done is not None:
            self.on_shard_done(fname, *self.digests[fname])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, whole or as its next block of rows; names, dtypes and shapes must
        follow the plan exactly."""
        if self._file is None:
            self._next_shard()
        fname, entries = self.shards[self._shard]
        want_name, dtype, shape, nbytes = entries[self._pos]
        got_dtype = TORCH_TO_ST.get(tensor.dtype)
        whole = tuple(tensor.shape) == tuple(shape) and self._partial == 0
        rows_ok = (
            len(shape) >= 1 and tuple(tensor.shape[1:]) == tuple(shape[1:]) and tensor.dim() == len(shape)
        )
        size = tensor.numel() * tensor.element_size()
        if name != want_name or got_dtype != dtype or not (whole or rows_ok) or self._partial + size > nbytes:
            raise RuntimeError(
                f"writer expected {want_name} {dtype}{list(shape)} but got {name} {got_dtype}{list(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._file.write(t.view(torch.uint8).numpy())
        self._partial += size
        if self._partial < nbytes:
            return
        self._partial = 0
        self._pos += 1
        if self._pos == len(entries):
            self._close_shard()
        elif self.on_piece_done is not None and self._file.size - self._checkpointed >= CHECKPOINT_BYTES:
            self._checkpointed = self._file.size
            self.on_piece_done(fname, self._pos, self._file.size, self._file.checkpoint())
            self._has_piece = True

    def write_index(self, metadata: dict[str, Any]) -> None:
        if len(self.shards) < 2:
            return
        weight_map = {name: fname for fname, entries in self.shards for name, *_ in entries}
        total = sum(nb for _, entries in self.shards for *_, nb in entries)
        self.write_json(INDEX, {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map})

    def write_json(self, name: str, data: Any) -> None:
        self.write_text(name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        try:
            (self.tmp / name).write_text(text, encoding="utf-8")
        except OSError as e:
            raise write_failed(self.tmp / name, e) from None

    def copy_file(self, src: Path, name: str | None = None) -> None:
        try:
            shutil.copyfile(src, self.tmp / (name or src.name))
        except OSError as e:
            raise write_failed(self.tmp / (name or src.name), e) from None

    def finish(self, overwrite: bool) -> Path:
        """Write the manifest last, then move the finished folder into place."""
        if self._file is not None or any(fname not in self.digests for fname, _ in self.shards):
            raise RuntimeError("finish() before every planned tensor was written")
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != JOURNAL:
                rel = p.relative_to(self.tmp).as_posix()
                files[rel] = self.digests.get(rel) or file_digest(p)
        manifest = {
            "files": {k: {"sha256": h, "size": n} for k, (h, n) in files.items()},
            **self.manifest_extra,
        }
        self.write_json(MANIFEST, manifest)
        _fsync_dir(self.tmp)
        out = self.out_dir
        old = None
        if out.exists():
            if not overwrite:
                raise OutputError(f"output {out} appeared while merging; pass --overwrite to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            (self.tmp / JOURNAL).unlink(missing_ok=True)
            os.replace(self.tmp, out)
        except OSError as e:
            if old is not None:  # put the previous output back
                os.replace(old, out)
            raise write_failed(out, e) from None
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out

    def abort(self, keep: bool = False) -> None:
        """Drop the unfinished shard (unless keep and part of it is journaled); with keep, leave the completed
        shards, that part and the journal for --resume."""
        if self._file is not None:
            if keep and self._has_piece:
                self._file.close()  # --resume verifies its journaled prefix and continues after it
            else:
                self._file.discard()
            self._file = None
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):  # one reused buffer: no allocation per block
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
