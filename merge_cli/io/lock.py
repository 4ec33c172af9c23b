"""recipe.lock.yaml: everything a merge read, pinned, so CI can rebuild the same bits.

A lock records the tool version, the recipe's sha256, the seed, and per model its reference, the
resolved hub commit (for hub models) and the sha256 of every file read (config, index, the weight shards
the plan uses, adapter files), plus the donor's side files. `merge-cli run` writes one into every output;
`merge-cli lock RECIPE` writes one without merging; `merge-cli run --locked LOCK` pins hub references to
the locked commits and refuses to run when anything differs.

Hashes are of file contents. For a hub file that is not downloaded (`merge-cli lock` online), the hub's
LFS sha256 is used: it is the sha256 of the same content.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import yaml

from merge_cli import __version__
from merge_cli.errors import MergeCliError
from merge_cli.io.checkpoint import INDEX_NAME, Checkpoint
from merge_cli.io.writer import file_digest

LOCK_NAME = "recipe.lock.yaml"
LOCK_VERSION = 1


class LockError(MergeCliError):
    """A lock file is unreadable, or the run differs from it."""


_BLOB_RE = re.compile(r"^[0-9a-f]{64}$")


def _cache_file() -> Path:
    root = os.environ.get("MERGE_CLI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "merge-cli"
    )
    return Path(root) / "sha256-cache.json"


def sha256_file(path: Path) -> str:
    """sha256 of a file. A hub-cache blob is named by its sha256 (LFS files), so its name is the answer;
    other files are hashed once and remembered by (real path, size, mtime_ns) in the user cache, so
    repeated merges of the same checkpoints do not read every input twice."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _BLOB_RE.match(real.name):
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest, _ = file_digest(real)
    with _cache_lock:  # the hashing threads of one process update the cache file one at a time
        _remember(cache_path, key, digest)
    return digest


_cache_lock = threading.Lock()


def _remember(cache_path: Path, key: str, digest: str) -> None:
    try:  # best effort: a read-only home simply means no cache
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[key] = digest
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass


def _unwrap_view(ck: Checkpoint, names: list[str]) -> tuple[Checkpoint, list[str]]:
    from merge_cli.io.vocab import VocabView

    while isinstance(ck, VocabView):
        names = [ck.alias.get(n, n) for n in names]
        ck = ck.inner
    return ck, names


def _entry(ck: Checkpoint, names: list[str]) -> dict[str, Any]:
    """One model's lock entry with file paths (or known hashes) still to hash."""
    from merge_cli.io.hub import HubCheckpoint
    from merge_cli.io.lora import ADAPTER_CONFIG, LoraCheckpoint

    ck, names = _unwrap_view(ck, names)
    if isinstance(ck, LoraCheckpoint):
        base = _entry(ck.base, [n for n in names if n not in ck.replaced and n in ck.base.tensors])
        adapter = _entry(ck.adapter, list(ck.adapter.tensors))
        folder = ck.adapter.folder
        if isinstance(ck.adapter, HubCheckpoint):
            adapter["files"][ADAPTER_CONFIG] = ck.adapter.repo.fetch(ADAPTER_CONFIG)
        elif folder is not None:
            adapter["files"][ADAPTER_CONFIG] = Path(folder) / ADAPTER_CONFIG
        return {"ref": ck.ref, "base": base, "adapter": adapter}
    files: dict[str, Any] = {}
    if isinstance(ck, HubCheckpoint):
        entry: dict[str, Any] = {
            "ref": ck.ref,
            "repo": ck.hub.repo_id,
            "revision": ck.hub.revision,
            "commit": ck.commit,
        }
        for small in ("config.json", INDEX_NAME):
            if ck.repo.has(small) and not ck.weights_only:
                files[small] = ck.repo.fetch(small)
        for n in names:
            rel = ck.filename(ck.tensors[n].file)
            if rel not in files:
                cached = ck.repo.cached(rel)
                files[rel] = (
                    cached if cached is not None else ck.repo.lfs_sha256.get(rel, "unknown (not downloaded)")
                )
        entry["files"] = dict(sorted(files.items()))
        return entry
    root = Path(ck.folder) if ck.folder is not None else Path(ck.path).parent
    entry = {"ref": ck.ref}
    for small in ("config.json", INDEX_NAME):
        if ck.folder is not None and (root / small).is_file():
            files[small] = root / small
    for n in names:
        p = Path(ck.tensors[n].file)
        files.setdefault(p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name, p)
    entry["files"] = dict(sorted(files.items()))
    return entry


def _needed(plan) -> dict[int, list[str]]:
    need: dict[int, list[str]] = {i: [] for i in range(len(plan.models))}
    for job in plan.jobs:
        for inp in ([job.base] if job.base else []) + job.inputs:
            need[inp.model].append(inp.name)
    return {i: list(dict.fromkeys(v)) for i, v in need.items()}


def _paths(node, out: list[Path]) -> None:
    if isinstance(node, dict):
        for v in node.values():
            _paths(v, out)
    elif isinstance(node, list):
        for v in node:
            _paths(v, out)
    elif isinstance(node, Path):
        out.append(node)


def _fill(node, digests: dict[Path, str]):
    if isinstance(node, dict):
        return {k: _fill(v, digests) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, digests) for v in node]
    if isinstance(node, Path):
        return digests[node]
    return node


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _nice(tid: int, value: int) -> None:
    """Set one thread's nice value (Linux: per thread); silently kept where not permitted (raising the
    priority back needs root or RLIMIT_NICE) or not supported."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, value)
    except (OSError, AttributeError):
        pass


class LockBuilder:
    """Collects what a plan reads; hash() (or start() + result()) computes the lock."""

    def __init__(self, plan, side_files: dict[str, Path] | None = None):
        recipe = plan.recipe
        need = _needed(plan)
        self.tree: dict[str, Any] = {
            "lock_version": LOCK_VERSION,
            "tool": f"merge-cli {__version__}",
            "recipe": recipe.path.name if recipe.path else None,
            "recipe_sha256": sha256_file(recipe.path) if recipe.path else None,
            "method": recipe.method,
            "seed": recipe.seed,
            "models": [
                {"label": m.label, **_entry(m.checkpoint, need[i])} for i, m in enumerate(plan.models)
            ],
            "side_files": dict(sorted((side_files or {}).items())),
        }
        self._threads: list[threading.Thread] = []
        self._tids: list[tuple[int, int]] = []  # the hashing threads and their own nice values
        self._digests: dict[Path, str] = {}
        self._result: dict | None = None
        self._error: BaseException | None = None

    def _paths(self) -> list[Path]:
        paths: list[Path] = []
        _paths(self.tree, paths)
        return list(dict.fromkeys(paths))

    def hash(self) -> dict[str, Any]:
        return _fill(self.tree, {p: sha256_file(p) for p in self._paths()})

    def start(self) -> LockBuilder:
        """Hash in background threads (hashlib releases the GIL), overlapping the merge: one per core (at
        most one per file), largest files first, each at a lower CPU priority (nice +10), so on a first run
        (no cached digests: about 0.75 s of CPU per GB with SHA extensions) they fill the cores the merge
        leaves idle instead of slowing it. result() restores their priority when the merge is done and
        waits for the rest, which then runs on every core."""
        paths = self._paths()
        todo = sorted(paths, key=_size, reverse=True)
        digests: dict[Path, str] = {}
        lock = threading.Lock()

        def work():
            tid = threading.get_native_id()
            try:
                nice0 = os.getpriority(os.PRIO_PROCESS, tid)
            except (OSError, AttributeError):
                nice0 = None
            if nice0 is not None:
                with lock:
                    self._tids.append((tid, nice0))
                _nice(tid, min(19, nice0 + 10))
            try:
                while True:
                    with lock:
                        if not todo or self._error is not None:
                            return
                        path = todo.pop(0)
                    digest = sha256_file(path)
                    with lock:
                        digests[path] = digest
            except BaseException as e:  # noqa: BLE001 - re-raised by result()
                self._error = e

        workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
        self._threads = [
            threading.Thread(target=work, name=f"merge-cli-lock-{i}", daemon=True) for i in range(workers)
        ]
        self._digests = digests
        for t in self._threads:
            t.start()
        return self

    def result(self) -> dict[str, Any]:
        if self._result is not None:
            return self._result
        if self._threads:
            for tid, nice0 in list(self._tids):  # the merge is done: the rest is the critical path
                _nice(tid, nice0)
            for t in self._threads:
                t.join()
            if self._error is not None:
                raise self._error
            self._result = _fill(self.tree, self._digests)
            return self._result
        return self.hash()


def hub_pins(lock: dict[str, Any]) -> dict[str, str]:
    """ref -> commit for every hub model (and hub base/adapter) in a lock."""
    pins: dict[str, str] = {}

    def visit(e):
        if isinstance(e, dict):
            if "commit" in e and "ref" in e:
                pins[e["ref"]] = e["commit"]
            for k in ("base", "adapter"):
                visit(e.get(k))

    for m in lock.get("models", []):
        visit(m)
    return pins


def dump_lock(lock: dict[str, Any]) -> str:
    head = (
        "# merge-cli lock file: the exact inputs of this merge. Rebuild with\n"
        "#   merge-cli run RECIPE OUT_DIR --locked recipe.lock.yaml\n"
    )
    return head + yaml.safe_dump(lock, sort_keys=False, width=200)


def load_lock(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LockError(f"{path}: cannot read the lock file ({e})") from None
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION or "models" not in data:
        raise LockError(
            f"{path}: not a merge-cli lock file (lock_version {LOCK_VERSION}); regenerate it with `merge-cli lock`"
        )
    return data


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(dict.fromkeys([*a, *b])):
            if k in ("label", "output", "recipe"):  # display-only keys; the recipe is compared by its sha256
                continue
            if k not in a:
                out.append(f"{where}{k}: not in the lock, now {b[k]!r}")
            elif k not in b:
                out.append(f"{where}{k}: locked {a[k]!r}, now absent")
            else:
                _diff(a[k], b[k], f"{where}{k}.", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where.rstrip('.')}: locked {len(a)} entries, now {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _diff(x, y, f"{where}{i}.", out)
    elif a != b:
        out.append(f"{where.rstrip('.')}: locked {a!r}, now {b!r}")


def compare(locked: dict[str, Any], current: dict[str, Any], lock_path: Path | str) -> None:
    """Raise LockError listing what differs (file hashes, commits, recipe, seed, tool version)."""
    diffs: list[str] = []
    _diff(locked, current, "", diffs)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise LockError(f"{lock_path}: this run differs from the lock: " + "; ".join(diffs[:3]) + more
                        + "; refusing to run (regenerate the lock with `merge-cli lock` if the change is intended)")  # fmt: skip


def summary_lines(lock: dict[str, Any]) -> list[str]:
    """Short lines for the model card: one per model with its commit or a local content hash."""
    lines = [f"{lock['tool']}, seed {lock['seed']}, recipe sha256 `{str(lock.get('recipe_sha256'))[:16]}`"]

    def one(e: dict) -> str:
        if "base" in e:
            return f"{one(e['base'])} + adapter {one(e['adapter'])}"
        if "commit" in e:
            return f"`{e['repo']}` @ `{e['commit'][:12]}`"
        w = [v for k, v in e.get("files", {}).items() if k.endswith(".safetensors")]
        return f"`{e['ref']}` (local, weights sha256 {', '.join(str(x)[:12] for x in w)})"

    lines += [f"{m.get('label', m['ref'])}: {one(m)}" for m in lock["models"]]
    return lines
