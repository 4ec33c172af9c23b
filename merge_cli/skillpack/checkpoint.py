"""`BASE+PACK.skillpack` as a merge source: the base's tensors with the pack's delta added on each read.

Reads return (base + delta) computed in float32 and rounded to the base tensor's dtype, rows on request.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import TensorInfo
from merge_cli.skillpack.format import Pack

PACK_SUFFIX = ".skillpack"


def is_pack_ref(ref: str) -> bool:
    return ref.strip().endswith(PACK_SUFFIX)


class PackCheckpoint(Checkpoint):
    def __init__(self, ref: str, base: Checkpoint, pack: Pack, pack_ref: str):
        self.ref = ref
        self.base = base
        self.pack = pack
        self.pack_ref = pack_ref
        self.path = Path(f"{base.path}+{pack.path}")  # its own identity: never taken for the plain base
        self.folder, self.config = base.folder, base.config
        self.files = base.files
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        self.allow_pickle = False
        pack.check_base(base, verify_sha=True)
        pack.check_values()

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        w = self.base.read_rows(name, start, stop)
        e = self.pack.tensors.get(name)
        if e is None or e["scheme"] in ("zero", "skip"):
            return w
        d = self.pack.delta_rows(name, start, stop) if e["shape"] else self.pack.delta(name)
        return (w.float() + d.reshape(w.shape)).to(w.dtype)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0] if info.shape else 1).reshape(info.shape)

    def num_layers(self) -> int | None:
        return self.base.num_layers()

    def fetch(self, names=None) -> list[str]:
        return self.base.fetch(names) if hasattr(self.base, "fetch") else []

    def close(self) -> None:
        self.base.close()
        self.pack.close()

    def describe(self) -> str:
        n = sum(e["scheme"] not in ("zero", "skip") for e in self.pack.tensors.values())
        return f"{n} tensor(s) grafted from SkillPack {self.pack.path.name}"
