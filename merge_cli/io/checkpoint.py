"""A model checkpoint: an HF folder (single file or index + shards) or one .safetensors file.

Only headers are read when a Checkpoint opens; tensors are read one at a time on request.
`resolve_model_path` is the seam where references that are not local paths (hub ids) get resolved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.pickle_loader import PICKLE_HINT, PICKLE_INDEX_NAME, PICKLE_NAME, PickleFile, is_pickle_path
from merge_cli.io.safetensors_file import SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def resolve_model_path(ref: str, base_dir: Path | None = None) -> Path:
    """A recipe's model reference -> a local path.

    Relative paths are tried against the recipe's folder first, then the working directory.
    """
    candidates = []
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and base_dir is not None:
        candidates.append(base_dir / p)
    candidates.append(p)
    for c in candidates:
        if c.exists():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise CheckpointError(
        f"model '{ref}': no such file or folder (looked in {looked}); fix the path in the recipe"
    )


def _short(e: BaseException) -> str:
    text = f"{e.__class__.__name__}: {e}"
    return text if len(text) <= 160 else text[:157] + "..."


def _safe_member(folder: Path, name: str, index_path: Path) -> Path:
    """A shard name from an index must stay inside the model folder (no '..', absolute paths or escaping links)."""
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or ".." in Path(name).parts
        or "\\" in name
    ):
        raise CheckpointError(
            f"{index_path}: weight_map names file {name!r} outside the model folder; refusing it"
        )
    path = folder / name
    real_folder = folder.resolve()
    try:
        real = path.resolve()
    except (OSError, ValueError) as e:  # symlink loops, NUL bytes
        raise CheckpointError(
            f"{index_path}: cannot resolve shard {name!r} ({getattr(e, 'strerror', None) or e})"
        ) from None
    if real_folder != real and real_folder not in real.parents:
        raise CheckpointError(
            f"{index_path}: shard {name!r} is a link that escapes the model folder; refusing it"
        )
    return path


class Checkpoint:
    """Header-level view of one model and lazy tensor reads."""

    def __init__(self, path: Path, ref: str | None = None, *, allow_pickle: bool = False):
        self.path = Path(path)
        self.ref = ref or str(path)
        self.allow_pickle = allow_pickle
        self.files: dict[Path, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.config: dict | None = None
        self.folder: Path | None = None
        if self.path.is_dir():
            self.folder = self.path
            self._open_folder()
        elif self.path.is_file() and is_pickle_path(self.path):
            self._add_file(self.path, None, loader=self._pickle_loader())
        elif self.path.is_file():
            self._add_file(self.path, None)
        else:
            raise CheckpointError(f"model '{self.ref}': {self.path} is neither a folder nor a file")
        if not self.tensors:
            raise CheckpointError(f"model '{self.ref}': {self.path} holds no tensors; is it the right path?")

    def _open_folder(self) -> None:
        folder = self.path
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except (OSError, ValueError, RecursionError) as e:
                raise CheckpointError(
                    f"{cfg}: unreadable config.json ({_short(e)}); fix or remove it"
                ) from None
            if not isinstance(self.config, dict):
                raise CheckpointError(f"{cfg}: config.json is not a JSON object")
        index = folder / INDEX_NAME
        if index.is_file():
            self._open_index(index, SafetensorsFile)
            return
        single = folder / SINGLE_NAME
        if single.is_file():
            self._add_file(single, None)
            return
        others = sorted(folder.glob("*.safetensors"))
        if len(others) == 1:
            self._add_file(others[0], None)
            return
        if (folder / PICKLE_INDEX_NAME).is_file():
            self._open_index(folder / PICKLE_INDEX_NAME, self._pickle_loader())
            return
        if (folder / PICKLE_NAME).is_file():
            self._add_file(folder / PICKLE_NAME, None, loader=self._pickle_loader())
            return
        raise CheckpointError(
            f"model '{self.ref}': {folder} has no {SINGLE_NAME} or {INDEX_NAME}; is it an HF model folder?"
        )

    def _pickle_loader(self):
        if not self.allow_pickle:
            raise CheckpointError(
                f"model '{self.ref}': {self.path} has only pickled PyTorch weights; {PICKLE_HINT}"
            )
        return PickleFile

    def _open_index(self, index: Path, loader) -> None:
        folder = self.path
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{index}: malformed index ({_short(e)}); re-download the model") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: malformed index (no weight_map object); re-download the model")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(
                f"{index}: weight_map maps '{bad[0]}' to {bad[1]!r}, not a file name; re-download the model"
            )
        by_file: dict[str, list[str]] = {}
        for tname, fname in weight_map.items():
            by_file.setdefault(fname, []).append(tname)
        for fname, names in sorted(by_file.items()):
            shard = _safe_member(folder, fname, index)
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard '{fname}' is missing from {folder}; download it again")
            self._add_file(shard, set(names), index, loader)

    def _add_file(
        self, path: Path, expected: set[str] | None, index: Path | None = None, loader=SafetensorsFile
    ) -> None:
        st = loader(path)
        self.files[path] = st
        if expected is not None:
            missing = expected - st.tensors.keys()
            if missing:
                name = sorted(missing)[0]
                raise CheckpointError(
                    f"{index}: tensor '{name}' is mapped to {path.name} but that shard does not hold it"
                )
        for name, info in st.tensors.items():
            if expected is not None and name not in expected:
                continue  # the index decides which shard owns a name
            if name in self.tensors:
                raise CheckpointError(f"model '{self.ref}': tensor '{name}' appears in two shards")
            self.tensors[name] = info

    # -- queries --------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.files[info.file].read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        info = self.tensors[name]
        return self.files[info.file].read_rows(info, start, stop)

    def prefetch(self, name: str) -> int:
        """Start reading a tensor's bytes into the page cache in the background (a cold-cache merge reads
        the next tensors while it merges this one); the bytes asked for (0 where it cannot)."""
        info = self.tensors.get(name)
        f = self.files.get(info.file) if info is not None else None
        if f is None:
            return 0
        f.prefetch(info.start, info.nbytes)
        return info.nbytes

    def num_layers(self) -> int | None:
        cfg = self.config or {}
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            v = cfg.get(key)
            if isinstance(v, int):
                return v
            text = cfg.get("text_config")
            if isinstance(text, dict) and isinstance(text.get(key), int):
                return text[key]
        return None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
