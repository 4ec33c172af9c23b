"""`BASE+PACK.skillpack` as a merge source: the base's tensors with the pack's delta added on each read.

Reads return (base + delta) computed in float32 and rounded to the base tensor's dtype, rows on request.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.overlay import OverlayCheckpoint
from merge_cli.skillpack.format import Pack

PACK_SUFFIX = ".skillpack"


def is_pack_ref(ref: str) -> bool:
    return ref.strip().endswith(PACK_SUFFIX)


class PackCheckpoint(OverlayCheckpoint):
    def __init__(self, ref: str, base: Checkpoint, pack: Pack, pack_ref: str):
        super().__init__(ref, base, Path(f"{base.path}+{pack.path}"))
        self.pack = pack
        self.pack_ref = pack_ref
        pack.check_base(base, verify_sha=True)
        pack.check_values()

    def delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        e = self.pack.tensors.get(name)
        if e is None or e["scheme"] in ("zero", "skip"):
            return None
        return self.pack.delta_rows(name, start, stop) if e["shape"] else self.pack.delta(name)

    def fetch(self, names=None) -> list[str]:
        return self.base.fetch(names) if hasattr(self.base, "fetch") else []

    def close(self) -> None:
        self.base.close()
        self.pack.close()

    def describe(self) -> str:
        n = sum(e["scheme"] not in ("zero", "skip") for e in self.pack.tensors.values())
        return f"{n} tensor(s) grafted from SkillPack {self.pack.path.name}"
