"""Model references beyond a local folder: hub ids (`org/name@rev`) and adapters (`base+adapter`).

open_checkpoint() here is the one way in for any reference: open_special() first, else a local
folder or file (io.checkpoint.Checkpoint). A reference that names an existing local file or folder is always local, so a folder called `org/name`
beside the recipe wins over the hub repo of that name.
"""

from __future__ import annotations

import os
from pathlib import Path

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint, resolve_model_path


def _local_exists(ref: str, base_dir: Path | None) -> bool:
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return True
    return p.exists()


def split_adapter(ref: str, base_dir: Path | None = None) -> tuple[str, str] | None:
    """`base+adapter` (mergekit's syntax) -> (base, adapter); None for a plain reference."""
    if "+" not in ref or _local_exists(ref, base_dir):
        return None
    base, _, adapter = ref.rpartition("+")
    base, adapter = base.strip(), adapter.strip()
    if not base or not adapter:
        raise CheckpointError(f"model '{ref}': write a base plus an adapter as BASE+ADAPTER")
    return base, adapter


def hub_ref_of(ref: str, base_dir: Path | None = None):
    """The HubRef a reference names, or None when it is local or cannot be a hub id."""
    from merge_cli.io.hub import parse_hub_ref

    if _local_exists(ref, base_dir) or ref.startswith((".", "/", "~")):
        return None
    return parse_hub_ref(ref)


def open_adapter(ref: str, base_dir: Path | None) -> tuple[Checkpoint, dict]:
    from merge_cli.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

    hub = hub_ref_of(ref, base_dir)
    if hub is not None:
        from merge_cli.io.hub import HubCheckpoint

        ck = HubCheckpoint(ref, hub, weights=ADAPTER_WEIGHTS)
        cfg_path = ck.side_file(ADAPTER_CONFIG)
        if cfg_path is None:
            raise CheckpointError(f"adapter '{ref}': the hub repo has no {ADAPTER_CONFIG}")
        return ck, read_adapter_config(cfg_path, ref)
    folder = resolve_model_path(ref, base_dir)
    if folder.is_file():
        folder = folder.parent
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"adapter '{ref}': {folder} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder?"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        other = "adapter_model.bin" if (folder / "adapter_model.bin").is_file() else ADAPTER_WEIGHTS
        raise CheckpointError(
            f"adapter '{ref}': {folder} has no {ADAPTER_WEIGHTS} (found: {other}); save it with safetensors"
        )
    cfg = read_adapter_config(folder / ADAPTER_CONFIG, ref)
    ck = Checkpoint(weights, ref)
    ck.folder = folder
    return ck, cfg


def _open_pack(ref: str, base: Checkpoint, pack_ref: str, base_dir: Path | None) -> Checkpoint:
    from merge_cli.skillpack.checkpoint import PackCheckpoint
    from merge_cli.skillpack.format import Pack

    try:
        pack = Pack(resolve_model_path(pack_ref, base_dir))
    except BaseException:
        base.close()
        raise
    try:
        return PackCheckpoint(ref, base, pack, pack_ref)
    except BaseException:
        base.close()
        pack.close()
        raise


def open_special(ref: str, base_dir: Path | None = None) -> Checkpoint | None:
    """A LoraCheckpoint or HubCheckpoint for `ref`, or None when `ref` is a plain local path."""
    pair = split_adapter(ref, base_dir)
    if pair is not None:
        from merge_cli.io.lora import LoraCheckpoint

        base = open_checkpoint(pair[0], base_dir)
        if pair[1].endswith(".skillpack"):  # issue 16: a SkillPack grafted onto the base
            return _open_pack(ref, base, pair[1], base_dir)
        try:
            adapter, cfg = open_adapter(pair[1], base_dir)
        except BaseException:
            base.close()
            raise
        try:
            return LoraCheckpoint(ref, base, adapter, cfg, pair[1])
        except BaseException:
            base.close()
            adapter.close()
            raise
    hub = hub_ref_of(ref, base_dir)
    if hub is not None:
        from merge_cli.io.hub import HubCheckpoint

        return HubCheckpoint(ref, hub)
    return None


def open_checkpoint(ref: str, base_dir: Path | None = None, *, allow_pickle: bool = False) -> Checkpoint:
    """Any model reference opened from its headers: a hub id, a base+adapter pair, or a local folder/file."""
    special = open_special(ref, base_dir)
    if special is not None:
        return special
    return Checkpoint(resolve_model_path(ref, base_dir), ref, allow_pickle=allow_pickle)
