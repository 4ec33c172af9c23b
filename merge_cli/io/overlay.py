"""A base checkpoint read through a delta: what `BASE+ADAPTER` (io/lora.py) and `BASE+PACK.skillpack`
(skillpack/checkpoint.py) share. Reads return base rows + delta rows computed in float32 and rounded once to
the base tensor's dtype; the adapted model is never materialised."""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import TensorInfo


class OverlayCheckpoint(Checkpoint):
    """Subclasses say which rows change (`delta_rows`, None for an untouched tensor) and may replace a base
    tensor whole (`base_rows`). `path` is the overlay's own identity, never taken for the plain base."""

    def __init__(self, ref: str, base: Checkpoint, path: Path):
        self.ref = ref
        self.base = base
        self.path = path
        self.folder, self.config = base.folder, base.config
        self.files = base.files
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        self.allow_pickle = False

    def base_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.base.read_rows(name, start, stop)

    def delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        raise NotImplementedError

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        w = self.base_rows(name, start, stop)
        delta = self.delta_rows(name, start, stop)
        if delta is None:
            return w
        return (w.float() + delta.reshape(w.shape)).to(w.dtype)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1).reshape(info.shape)

    def num_layers(self) -> int | None:
        return self.base.num_layers()
