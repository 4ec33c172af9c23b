"""One .safetensors file: a validated header and lazy, copy-once tensor reads.

We parse the header ourselves instead of memory-mapping the file: every offset, shape and byte count
is checked before any tensor is read (a hostile or truncated file gives one clear error), and reads go
through os.pread into private buffers, so mapped file pages never pile up in the process's RSS.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_cli.dtypes import ITEMSIZE, ST_TO_TORCH
from merge_cli.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024


MAP_MIN_BYTES = 1 << 20  # tensors from this size up are mapped, smaller ones read
_MADV_POPULATE_READ = 22  # Linux 5.14+


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A validated safetensors header with thread-safe positional reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- header ---------------------------------------------------------------------------------
    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; re-download or re-save the file")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail(
                        f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
                    )
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER_BYTES:
                    raise self._fail(f"header length {hlen} is larger than the {MAX_HEADER_BYTES}-byte limit")
                if 8 + hlen > size:
                    raise self._fail(
                        f"truncated: header length {hlen} runs past the end of the {size}-byte file"
                    )
                raw = f.read(hlen)
        except OSError as e:
            raise CheckpointError(
                f"{self.path}: cannot read ({e.strerror or e}); check the path and permissions"
            ) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"malformed header JSON ({e.__class__.__name__}: {e})") from None
        except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, or nesting a thousand deep
            raise self._fail(f"malformed header JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + hlen
        data_size = size - data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("__metadata__ is not an object")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        spans = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_start, data_size)
            self.tensors[name] = info
            spans.append((info.start, info.start + info.nbytes, name))
        spans.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise self._fail(f"tensors '{name_a}' and '{name_b}' overlap in the data section")

    def _entry(self, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"header entry for '{name}' is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
            raise self._fail(f"tensor '{name}' has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"tensor '{name}' has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise self._fail(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise self._fail(f"tensor '{name}' has data_offsets {offsets} out of order")
        if end > data_size:
            raise self._fail(
                f"truncated: tensor '{name}' ends at byte {end} but the data section holds {data_size}"
            )
        want = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != want:
            raise self._fail(
                f"tensor '{name}': shape {shape} of {dtype} needs {want} bytes but data_offsets span {end - begin}"
            )
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, want)

    # -- reads ----------------------------------------------------------------------------------
    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(
                        f"{self.path}: cannot open ({e.strerror}); check the file"
                    ) from None
            return self._fd

    def read_bytes(self, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start + nbytes) of the file, read straight into a new uint8 tensor (torch's
        allocator: uninitialised, and on huge pages where enabled, so no page is touched twice)."""
        fd = self._open()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return buf
        view = memoryview((ctypes.c_char * nbytes).from_address(buf.data_ptr())).cast("B")
        got = 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], start + got)
            if n <= 0:
                raise self._fail(
                    f"file ended while reading bytes {start + got}..{start + nbytes} (truncated?)"
                )
            got += n
        return buf

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def prefetch(self, start: int, nbytes: int) -> None:
        """Ask the kernel to start reading bytes [start, start + nbytes) into the page cache now
        (POSIX_FADV_WILLNEED: asynchronous, best effort), so a later read finds them there."""
        try:
            os.posix_fadvise(self._open(), start, nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # no fadvise here: the read just waits for the disk
            pass

    def read_rows(self, info: TensorInfo, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) of a tensor (the whole tensor for 0-d), as a CPU tensor in its own dtype."""
        dtype = ST_TO_TORCH[info.dtype]
        if not info.shape:
            buf = self.read_bytes(info.start, info.nbytes)
            return _from_buffer(buf, dtype).reshape(())
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        start, nbytes = info.start + row_start * row_bytes, (row_stop - row_start) * row_bytes
        buf = self.map_bytes(start, nbytes) if nbytes >= MAP_MIN_BYTES else self.read_bytes(start, nbytes)
        return _from_buffer(buf, dtype).reshape((row_stop - row_start, *info.shape[1:]))

    def map_bytes(self, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start + nbytes) of the file as a uint8 tensor over a private mapping of just that
        range: no copy (the page cache's pages are mapped), and the mapping goes away with the tensor, so
        mapped pages count in RSS only while the tensor lives. Writes stay private (copy on write). The page
        tables are filled here (MADV_POPULATE_READ), so the reader thread, not the kernels, pays for them."""
        fd = self._open()
        lead = start % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(
                fd, nbytes + lead, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start - lead,
            )  # fmt: skip
        except (OSError, ValueError, AttributeError):  # e.g. past the end of a truncated file: pread says so
            return self.read_bytes(start, nbytes)
        try:
            mm.madvise(_MADV_POPULATE_READ)
        except (OSError, AttributeError):  # older kernels: pages fault in on first touch instead
            pass
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=lead)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _from_buffer(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if buf.numel() == 0:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bool:
        return buf.to(torch.bool)
    return buf.view(dtype)
