"""Pickled PyTorch weights (pytorch_model.bin), loaded only on request and only with torch's weights-only loader.

A pickle can carry code that runs on load. merge-cli never calls a full unpickler: these files open only
when the user passes --allow-pickle, and then through torch.load(weights_only=True), whose restricted
unpickler rebuilds tensors and plain containers and refuses everything else. The file is memory-mapped
where torch supports it (the zip format of torch >= 1.6), so tensors are paged in as they are read.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from merge_cli.dtypes import ITEMSIZE, TORCH_TO_ST
from merge_cli.errors import CheckpointError
from merge_cli.io.safetensors_file import TensorInfo

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"

PICKLE_HINT = (
    "convert them to safetensors, or pass --allow-pickle to load them with torch's weights-only loader"
)


def is_pickle_path(path: Path) -> bool:
    return path.suffix in PICKLE_SUFFIXES


def _load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
    # the legacy (pre-zip) format cannot be memory-mapped; it still goes through the weights-only unpickler
    return torch.load(path, map_location="cpu", weights_only=True)


def _reason(e: Exception) -> str:
    """A short cause, without torch's advice to retry with weights_only=False."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if m:
        return f"{e.__class__.__name__}: it references {m.group(1)}, which is not plain tensor data"
    first = (str(e).strip().splitlines() or [""])[0]
    if "weights_only" in first or "Weights only" in first:
        return e.__class__.__name__
    return f"{e.__class__.__name__}: {first[:160]}"


class PickleFile:
    """A state dict from one pickle file, with the interface of SafetensorsFile (tensors, read_rows, close)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._data: dict[str, torch.Tensor] = {}
        try:
            state = _load(self.path)
        except OSError as e:
            raise CheckpointError(
                f"{self.path}: cannot read ({e.strerror or e}); check the path and permissions"
            ) from None
        except Exception as e:  # the weights-only unpickler refused it, or the file is corrupt
            raise CheckpointError(
                f"{self.path}: torch's weights-only loader refused the file ({_reason(e)}); it may be corrupt "
                "or carry code, and merge-cli never runs it; convert it to safetensors with a tool you trust"
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.path}: holds a {type(state).__name__}, not a state dict of named tensors"
            )
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"{self.path}: entry {name!r} is a {type(t).__name__}, not a tensor; only flat state dicts are supported"
                )
            code = TORCH_TO_ST.get(t.dtype)
            if code is None:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {t.dtype}")
            shape = tuple(t.shape)
            self._data[name] = t
            self.tensors[name] = TensorInfo(
                name, code, shape, self.path, 0, math.prod(shape) * ITEMSIZE[code]
            )

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, info: TensorInfo, row_start: int, row_stop: int) -> torch.Tensor:
        t = self._data[info.name]
        if not info.shape:
            return t.detach().clone()
        return t[row_start:row_stop].detach().contiguous().clone()

    def close(self) -> None:
        self._data.clear()
