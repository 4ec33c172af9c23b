"""Build a Hugging Face hub cache by hand, in huggingface_hub's layout, for offline tests:

    <cache>/models--org--name/blobs/<etag>
    <cache>/models--org--name/snapshots/<commit>/<file>  -> ../../blobs/<etag> (relative symlink)
    <cache>/models--org--name/refs/<branch or tag>       (holds the commit hash)

LFS files (weights) have their sha256 as etag, as on the hub; small files a git-blob-like sha1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def _etag(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".safetensors", ".bin"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(
    cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",), commit: str | None = None
) -> str:
    """Put every file of `folder` into the cache as one commit of `repo_id`; point `refs` at it. Returns the commit."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for p in files:
            h.update(p.relative_to(folder).as_posix().encode() + _etag(p).encode())
        commit = h.hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for p in files:
        etag = _etag(p)
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit
