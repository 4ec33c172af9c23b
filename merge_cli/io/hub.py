"""Hugging Face Hub references: `org/name` and `org/name@revision` (branch, tag or commit).

A HubCheckpoint is planned from metadata alone: config.json and the shard index (small files) are
fetched, safetensors headers come from the hub's metadata API (HTTP range reads of the header only) or,
when a shard is already cached or HF_HUB_OFFLINE is set, from the cached file. Weight shards are
downloaded with hf_hub_download only when `fetch()` is called just before the merge (or on first read),
and only the shards that hold tensors the plan reads.

Environment: HF_HUB_CACHE / HF_HOME choose the cache, HF_TOKEN authenticates, HF_HUB_OFFLINE=1 uses the
cache only. All three are read when used (not when this module is imported), so tests and wrappers can
set them at run time.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from merge_cli.io.safetensors_file import SafetensorsFile, TensorInfo

_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}

# ref -> commit, set by `merge-cli run --locked` so branches resolve to the locked commits
_PINS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "merge_cli_hub_pins", default=None
)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse_hub_ref(ref: str) -> HubRef | None:
    """`org/name[@rev]` -> HubRef; None for anything that cannot be a hub model id."""
    ref = ref.strip()
    if ref.startswith(("hf://", "hf:")):
        ref = ref.split(":", 1)[1].lstrip("/")
    m = _REPO_RE.match(ref)
    if not m or ".." in ref or m.group("repo").endswith((".", "-")):
        return None
    return HubRef(m.group("repo"), m.group("rev") or "main")


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def pinned(pins: dict[str, str]):
    """Within this block, the hub refs named in `pins` resolve to the given commits."""
    token = _PINS.set(dict(pins))
    try:
        yield
    finally:
        _PINS.reset(token)


def _hub_error(ref: HubRef, e: Exception, what: str = "") -> CheckpointError:
    from huggingface_hub import errors as he

    name = type(e).__name__
    if isinstance(e, he.GatedRepoError):
        msg = "is gated: accept its terms on huggingface.co and set HF_TOKEN"
    elif isinstance(e, he.RepositoryNotFoundError):
        msg = "was not found on the hub (and no local folder has that name); check the spelling, or set HF_TOKEN for a private repo"
    elif isinstance(e, he.RevisionNotFoundError):
        msg = f"has no revision '{ref.revision}'; use a branch, tag or commit that exists"
    elif isinstance(e, he.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: test it first
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not be reached"
        msg = (
            f"{what or 'a file'} is not in the local cache {hub_cache_dir()} and {why}; "
            "run once online or point HF_HUB_CACHE at a cache that has it"
        )
    elif isinstance(e, he.EntryNotFoundError):
        msg = f"has no file {what}" if what else "is missing a file"
    else:
        msg = f"could not be reached ({name}: {str(e).splitlines()[0] if str(e) else ''}); no local folder has that name either; check the path or the network, or set HF_HUB_OFFLINE=1 to use the cache"
    return CheckpointError(f"hub model '{ref}' {msg}")


class HubRepo:
    """One hub repo at one resolved commit: its file list, cached paths and downloads."""

    def __init__(self, ref: HubRef, pin: str | None = None):
        self.ref = ref
        self.offline = hub_offline()
        self.cache = hub_cache_dir()
        self.repo_dir = self.cache / ("models--" + ref.repo_id.replace("/", "--"))
        self.lfs_sha256: dict[str, str] = {}
        self.card: dict = {}
        rev = pin or ref.revision
        if self.offline:
            self.commit = self._cached_commit(rev)
            snap = self.repo_dir / "snapshots" / self.commit
            self.files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
        else:
            from huggingface_hub import HfApi

            try:
                info = HfApi().model_info(ref.repo_id, revision=rev, files_metadata=True)
            except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
                raise _hub_error(ref, e) from None
            self.commit = info.sha
            self.files = sorted(s.rfilename for s in info.siblings or [])
            for s in info.siblings or []:
                if s.lfs is not None and getattr(s.lfs, "sha256", None):
                    self.lfs_sha256[s.rfilename] = s.lfs.sha256
            if info.card_data is not None:
                self.card = info.card_data.to_dict()
        if pin and self.commit != pin:
            raise CheckpointError(
                f"hub model '{ref}': locked commit {pin} could not be resolved (got {self.commit})"
            )
        self.snapshot = self.repo_dir / "snapshots" / self.commit

    def _cached_commit(self, rev: str) -> str:
        if _COMMIT_RE.match(rev):
            if (self.repo_dir / "snapshots" / rev).is_dir():
                return rev
        else:
            refs = self.repo_dir / "refs" / rev
            if refs.is_file():
                return refs.read_text().strip()
        raise CheckpointError(
            f"hub model '{self.ref}': no local folder has that name, and revision '{rev}' is not in the local hub cache "
            f"{self.cache} (HF_HUB_OFFLINE is set); "
            "download it once online, or point HF_HUB_CACHE / HF_HOME at a cache that has it"
        )

    def has(self, filename: str) -> bool:
        return filename in self.files

    def cached(self, filename: str) -> Path | None:
        p = self.snapshot / filename
        return p if p.is_file() else None

    def fetch(self, filename: str) -> Path:
        """The local path of one file at the resolved commit, downloading it if needed."""
        hit = self.cached(filename)
        if hit is not None:
            return hit
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(
                    self.ref.repo_id,
                    filename,
                    revision=self.commit,
                    cache_dir=self.cache,
                    local_files_only=self.offline,
                )
            )
        except Exception as e:  # noqa: BLE001
            raise _hub_error(self.ref, e, filename) from None

    def header(self, filename: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """name -> (dtype, shape, nbytes) of one safetensors file, without downloading its weights."""
        hit = self.cached(filename)
        if hit is not None:
            st = SafetensorsFile(hit)
            try:
                return {n: (t.dtype, t.shape, t.nbytes) for n, t in st.tensors.items()}
            finally:
                st.close()
        if self.offline:
            raise CheckpointError(
                f"hub model '{self.ref}': {filename} is not in the local cache {self.cache} and HF_HUB_OFFLINE is set"
            )
        from huggingface_hub import HfApi

        try:
            meta = HfApi().parse_safetensors_file_metadata(self.ref.repo_id, filename, revision=self.commit)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(self.ref, e, filename) from None
        return {
            n: (t.dtype, tuple(t.shape), t.data_offsets[1] - t.data_offsets[0])
            for n, t in meta.tensors.items()
        }


class HubCheckpoint(Checkpoint):
    """A Checkpoint planned from hub metadata; weight shards are downloaded by fetch() or the first read."""

    def __init__(self, ref: str, hub: HubRef, weights: str | None = None):
        self.ref = ref
        self.hub = hub
        self.repo = HubRepo(hub, (_PINS.get() or {}).get(ref))
        self.path = self.folder = self.repo.snapshot
        self.files: dict[Path, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.config = None
        self.weights_only = weights is not None  # an adapter's weights file, not a model folder
        self._fetch_lock = threading.Lock()
        self._remote: dict[str, tuple[str, tuple[int, ...]]] = {}
        if weights is None and self.repo.has("config.json"):
            try:
                self.config = json.loads(self.repo.fetch("config.json").read_text())
            except (ValueError, RecursionError) as e:
                raise CheckpointError(f"hub model '{ref}': unreadable config.json ({str(e)[:120]})") from None
        for fname in self._weight_files(weights):
            for name, (dtype, shape, nbytes) in self.repo.header(fname).items():
                if name in self.tensors:
                    raise CheckpointError(f"hub model '{ref}': tensor '{name}' appears in two shards")
                self._remote[name] = (dtype, shape)
                self.tensors[name] = TensorInfo(name, dtype, shape, self.repo.snapshot / fname, -1, nbytes)
        if not self.tensors:
            raise CheckpointError(f"hub model '{ref}' (commit {self.repo.commit[:12]}) holds no tensors")

    def _weight_files(self, weights: str | None) -> list[str]:
        if weights is not None:
            if not self.repo.has(weights):
                raise CheckpointError(f"hub repo '{self.hub}' has no {weights}")
            return [weights]
        if self.repo.has(INDEX_NAME):
            try:
                wm = json.loads(self.repo.fetch(INDEX_NAME).read_text())["weight_map"]
                names = sorted(set(wm.values()))
            except (
                ValueError,
                KeyError,
                TypeError,
                AttributeError,
                RecursionError,
            ) as e:  # issue 6: hostile index
                raise CheckpointError(
                    f"hub model '{self.ref}': malformed {INDEX_NAME} ({e.__class__.__name__}: {str(e)[:120]})"
                ) from None
            bad = [n for n in names if not isinstance(n, str) or ".." in n.split("/") or n.startswith("/")]
            if bad:
                raise CheckpointError(f"hub model '{self.ref}': index names file {bad[0]!r} outside the repo")
            return names
        if self.repo.has(SINGLE_NAME):
            return [SINGLE_NAME]
        st = [f for f in self.repo.files if f.endswith(".safetensors") and "/" not in f]
        if len(st) == 1:
            return st
        if any(f.startswith("pytorch_model") for f in self.repo.files):
            raise CheckpointError(
                f"hub model '{self.ref}' has only pickled pytorch_model.bin weights; pick a safetensors revision"
            )
        raise CheckpointError(f"hub model '{self.ref}' has no {SINGLE_NAME} or {INDEX_NAME}")

    @property
    def commit(self) -> str:
        return self.repo.commit

    def filename(self, path: Path) -> str:
        return Path(path).relative_to(self.repo.snapshot).as_posix()

    def pending(self, names=None) -> list[str]:
        """Weight files (repo paths) holding `names` (default: all tensors) that are not downloaded yet."""
        infos = [self.tensors[n] for n in (names if names is not None else self.tensors)]
        return sorted({self.filename(i.file) for i in infos if i.file not in self.files})

    def fetch(self, names=None) -> list[str]:
        """Download the shards holding `names` and switch their tensors to the local, verified headers."""
        todo = self.pending(names)
        for fname in todo:
            self._fetch_file(fname)
        return todo

    def _fetch_file(self, fname: str) -> None:
        with self._fetch_lock:
            key = self.repo.snapshot / fname
            if key in self.files:
                return
            st = SafetensorsFile(self.repo.fetch(fname))
            for name, info in list(self.tensors.items()):
                if info.file != key:
                    continue
                got = st.tensors.get(name)
                if got is None or (got.dtype, got.shape) != self._remote[name]:
                    st.close()
                    raise CheckpointError(
                        f"hub model '{self.ref}': downloaded {fname} does not match its header for '{name}'; "
                        "delete it from the cache and retry"
                    )
                self.tensors[name] = TensorInfo(name, got.dtype, got.shape, key, got.start, got.nbytes)
            self.files[key] = st

    def read(self, name):
        if self.tensors[name].start < 0:
            self._fetch_file(self.filename(self.tensors[name].file))
        return super().read(name)

    def read_rows(self, name, start, stop):
        if self.tensors[name].start < 0:
            self._fetch_file(self.filename(self.tensors[name].file))
        return super().read_rows(name, start, stop)

    def side_file(self, name: str) -> Path | None:
        """A small non-weight file of the repo (tokenizer, generation config...), fetched; None if absent."""
        return self.repo.fetch(name) if self.repo.has(name) else None
