"""The steps a run takes around the engine for issue 7 (hub, lock, side files, card).

Before the first weight moves: the chat template is resolved, card metadata (licenses) gathered, and only
then are the hub shards the plan reads downloaded. The lock is hashed in the background during the merge,
or up front and compared when the run is `--locked`, so a differing input stops the run before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_cli.io.lock import LockBuilder, LockError, _needed, compare
from merge_cli.output.card import card_metadata
from merge_cli.output.sidefiles import donor_side_files, resolve_chat_template


@dataclass
class Prepared:
    side_files: dict[str, Path]
    template: tuple[str, str] | None
    front: dict[str, Any]
    lock: LockBuilder
    locked: dict | None = None
    fetched: list[str] = field(default_factory=list)
    output_matches: bool | None = None

    def finish_lock(self, writer) -> dict[str, Any]:
        """The run's lock, with the sha256 of every output shard."""
        lock = self.lock.result()
        lock["output"] = {name: digest for name, (digest, _size) in sorted(writer.digests.items())}
        if self.locked is not None and self.locked.get("output"):
            self.output_matches = self.locked["output"] == lock["output"]
        return lock


def fetch_inputs(plan) -> list[str]:
    """Download (hub models only) the weight files holding the tensors the plan reads."""
    need = _needed(plan)
    got = []
    for i, m in enumerate(plan.models):
        fetch = getattr(m.checkpoint, "fetch", None)
        if fetch is not None:
            got += [f"{m.label}:{f}" for f in fetch(need[i])]
    return got


def prepare_inputs(plan, locked: dict | None = None, lock_path: Path | str = "lock") -> Prepared:
    template = resolve_chat_template(plan)
    front, warnings = card_metadata(plan)
    plan.notes.extend(w for w in warnings if w not in plan.notes)
    fetched = fetch_inputs(plan)
    side = donor_side_files(plan)
    builder = LockBuilder(plan, side)
    if locked is not None:
        current = builder.hash()
        compare(locked, current, lock_path)
        builder._result = current
    else:
        builder.start()
    return Prepared(side, template, front, builder, locked, fetched)


__all__ = ["Prepared", "prepare_inputs", "fetch_inputs", "LockError"]
