"""Resumable merges: a journal of completed shards in the temporary output folder.

A merge writes into `.OUT.partial/` beside the output. The journal there (JOURNAL, one JSON object per
line) starts with a fingerprint of the plan, then gets one line per shard once that shard is fsynced:
its file name, sha256, size and the per-tensor statistics the report needs. An unfinished shard gets a
"piece" line each time another CHECKPOINT_BYTES of it are fsynced (io/writer.py): how many of its tensors
are written, the byte offset they end at, the sha256 of the file up to there, and those tensors'
statistics. A process killed at any moment (SIGKILL included) leaves at worst a partly written shard and a
torn last journal line. `merge-cli run RECIPE OUT --resume` checks the fingerprint, re-hashes every
journaled shard, keeps those that match, continues the unfinished shard after its last verified piece,
and computes only the rest: a kill loses at most the tensors written since the last checkpoint. Kernels are deterministic and random methods are
seeded per tensor, so the resumed output is bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_cli import __version__
from merge_cli.errors import MergeCliError, OutputError
from merge_cli.io.writer import (
    JOURNAL,
    PartialShard,
    ShardedWriter,
    WriteError,
    file_digest,
    temp_dir_for,
    write_failed,
)
from merge_cli.plan import MergePlan, TensorJob

JOURNAL_FORMAT = 2  # 2: piece lines for unfinished shards


def resume_hint(recipe: Path | str | None, out_dir: Path | str) -> str:
    return f"resume with: merge-cli run {recipe or 'RECIPE'} {out_dir} --resume"


def plan_fingerprint(plan: MergePlan) -> str:
    """sha256 over everything that decides the output bytes: tool version, recipe text, the resolved plan
    (models, jobs, parameters, shards, dtypes, seed, config) and every input file's size and mtime."""
    recipe_path = plan.recipe.path
    try:
        recipe_text = recipe_path.read_bytes() if recipe_path else b""
    except OSError:
        recipe_text = b""
    inputs = []
    for m in plan.models:
        ck = m.checkpoint
        files = sorted(str(f) for f in getattr(ck, "files", None) or {})
        folder = getattr(ck, "folder", None)
        if folder is not None and (Path(folder) / "config.json").is_file():
            files.append(str(Path(folder) / "config.json"))
        for f in files:
            try:
                st = os.stat(f)
                inputs.append([f, st.st_size, st.st_mtime_ns])
            except OSError:
                inputs.append([f, None, None])
    doc = {
        "tool": __version__,
        "journal": JOURNAL_FORMAT,
        "recipe_sha256": hashlib.sha256(recipe_text).hexdigest(),
        "seed": plan.recipe.seed,
        "plan": {k: v for k, v in plan.to_json().items() if k != "notes"},  # notes grow as a run prepares
        "config": plan.config,
        "inputs": inputs,
    }
    raw = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def _read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """(header, shard records) from a journal; a torn or garbled line ends it (what follows is ignored)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return None, []
    records = []
    for raw in lines:
        try:
            rec = json.loads(raw)
        except ValueError:
            break
        if not isinstance(rec, dict):
            break
        records.append(rec)
    if not records or "fingerprint" not in records[0]:
        return None, []
    return records[0], records[1:]


@dataclass
class ResumeState:
    """What an earlier run left that can be reused."""

    reuse: dict[str, tuple[str, int]] = field(default_factory=dict)  # shard file -> (sha256, size)
    partial: PartialShard | None = None  # the unfinished shard, continued after its verified tensors
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # tensor name -> report statistics
    records: list[dict] = field(default_factory=list)
    note: str = ""


def load_resume_state(plan: MergePlan, out_dir: Path, fingerprint: str) -> ResumeState:
    """Verify what an interrupted run left in the temporary folder and clear out everything else."""
    tmp = temp_dir_for(out_dir)
    if not tmp.is_dir():
        return ResumeState(note=f"nothing to resume ({tmp} does not exist): merging from the start")
    header, records = _read_journal(tmp / JOURNAL)
    if header is None:
        return ResumeState(note=f"nothing to resume ({tmp} holds no journal): merging from the start")
    if header.get("fingerprint") != fingerprint:
        raise OutputError(
            f"{tmp} was left by a merge with a different recipe, inputs or merge-cli version; "
            "run without --resume to start over"
        )
    shards = {s.filename: s for s in plan.shards}
    names = {s.filename: [plan.jobs[i].name for i in s.jobs] for s in plan.shards}
    state = ResumeState()
    for rec in records:
        fname = rec.get("shard")
        stats = rec.get("tensors")
        if (
            not isinstance(fname, str)
            or fname not in shards
            or fname in state.reuse
            or not isinstance(stats, list)
        ):
            continue
        path = tmp / fname
        if not path.is_file() or [t.get("name") for t in stats if isinstance(t, dict)] != names[fname]:
            continue
        try:
            if file_digest(path) != (rec.get("sha256"), rec.get("size")):
                continue  # changed or damaged since: compute it again
        except OSError:
            continue
        state.reuse[fname] = (rec["sha256"], rec["size"])
        state.stats.update({t["name"]: t for t in stats})
        state.records.append(rec)
    state.partial, pieces = _verified_piece(tmp, records, names, state.reuse)
    for rec in pieces:
        state.stats.update({t["name"]: t for t in rec["tensors"]})
        state.records.append(rec)
    keep = set(state.reuse) | ({state.partial.filename} if state.partial else set())
    # anything else in the folder (an unfinished shard's unverified part, side files, a manifest) is rebuilt
    try:
        for p in tmp.iterdir():
            if p.name != JOURNAL and p.name not in keep:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    except OSError as e:
        raise write_failed(tmp, e) from None
    state.note = f"resuming: {len(state.reuse)} of {len(plan.shards)} shard(s) already complete and verified"
    if state.partial is not None:
        state.note += f", and {state.partial.count} tensor(s) of {state.partial.filename}"
    return state


def _verified_piece(
    tmp: Path, records: list[dict], names: dict[str, list[str]], complete: dict
) -> tuple[PartialShard | None, list[dict]]:
    """The unfinished shard's longest journaled prefix whose bytes still hash as journaled, and the piece
    records it covers. Only the last shard with piece lines (and no valid shard line) can be unfinished."""
    pieces = [r for r in records if isinstance(r.get("piece"), str) and r["piece"] in names]
    if not pieces or pieces[-1]["piece"] in complete:
        return None, []
    fname = pieces[-1]["piece"]
    ordered, count = [], 0
    for r in pieces:  # consecutive, growing pieces of that shard whose tensors follow the plan
        if r["piece"] != fname:
            continue
        got = [t.get("name") for t in r.get("tensors", []) if isinstance(t, dict)]
        c, end = r.get("count"), r.get("end")
        if not (
            isinstance(c, int)
            and isinstance(end, int)
            and got == names[fname][count:c]
            and c < len(names[fname])
        ):
            break
        ordered.append(r)
        count = c
    h, done, best = hashlib.sha256(), 0, None
    try:
        with open(tmp / fname, "rb") as f:
            for i, r in enumerate(ordered):
                while done < r["end"]:
                    chunk = f.read(min(1 << 20, r["end"] - done))
                    if not chunk:
                        break
                    h.update(chunk)
                    done += len(chunk)
                if done != r["end"] or h.hexdigest() != r.get("sha256"):
                    break
                best = (i, h.copy())
    except OSError:
        return None, []
    if best is None:
        return None, []
    i, sha = best
    return PartialShard(fname, ordered[i]["count"], ordered[i]["end"], sha), ordered[: i + 1]


class Journal:
    """Appends one fsynced line per completed shard. A line needs both halves: the writer thread reports the
    shard flushed to disk, the compute thread reports each of its tensors' statistics; whichever arrives
    last writes the line (tensors can be written in row chunks before their statistics exist)."""

    def __init__(self, path: Path, plan: MergePlan):
        self.path = path
        self.names = {s.filename: [plan.jobs[i].name for i in s.jobs] for s in plan.shards}
        self._pending: dict[str, dict[str, Any]] = {}  # tensor name -> statistics
        self._flushed: dict[str, tuple[str, int]] = {}  # shard on disk, waiting for statistics
        self._pieces: list[tuple[str, int, int, str]] = []  # durable parts of a shard, waiting for statistics
        self._covered: dict[str, int] = {}  # shard -> tensors already journaled in piece lines
        self._written: dict[str, dict[str, Any]] = {}  # their statistics, for the shard line
        self._lock = threading.Lock()
        self._append_lock = threading.Lock()
        self.completed = 0

    def start(self, fingerprint: str, records: list[dict]) -> None:
        """Write the journal afresh (header + still-valid records) and make it durable."""
        lines = [{"fingerprint": fingerprint, "format": JOURNAL_FORMAT}, *records]
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines)
        part = self.path.with_name(self.path.name + ".new")
        try:
            with open(part, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, self.path)
        except OSError as e:
            raise write_failed(self.path, e) from None

    def record_stats(self, job: TensorJob, stats: dict[str, Any]) -> None:
        with self._lock:
            self._pending[job.name] = stats
            ready = self._ready()
        self._append(ready)

    def shard_done(self, fname: str, sha256: str, size: int) -> None:
        with self._lock:
            self._flushed[fname] = (sha256, size)
            ready = self._ready()
        self._append(ready)

    def resume_from(self, partial: PartialShard | None, stats: dict[str, dict[str, Any]]) -> None:
        """A continued shard's verified tensors count as journaled (their statistics come from the journal)."""
        if partial is not None:
            self._covered[partial.filename] = partial.count
            for n in self.names[partial.filename][: partial.count]:
                self._written[n] = stats[n]

    def piece_done(self, fname: str, count: int, end: int, sha256: str) -> None:
        with self._lock:
            self._pieces.append((fname, count, end, sha256))
            ready = self._ready()
        self._append(ready)

    def _ready(self) -> list[dict]:
        out = []
        while self._pieces:
            fname, count, end, sha256 = self._pieces[0]
            names = self.names[fname][self._covered.get(fname, 0) : count]
            if not all(n in self._pending for n in names):
                break
            self._pieces.pop(0)
            tensors = [self._pending.pop(n) for n in names]
            self._written.update({t["name"]: t for t in tensors})
            self._covered[fname] = count
            out.append({"piece": fname, "count": count, "end": end, "sha256": sha256, "tensors": tensors})
        for fname, (sha256, size) in list(self._flushed.items()):
            names = self.names[fname]
            if all(n in self._pending or n in self._written for n in names):
                del self._flushed[fname]
                tensors = [self._pending.pop(n, None) or self._written.pop(n) for n in names]
                out.append({"shard": fname, "sha256": sha256, "size": size, "tensors": tensors})
        return out

    def _append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, separators=(",", ":"), default=_jsonable) + "\n" for r in records)
        with self._append_lock:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise write_failed(self.path, e) from None
            self.completed += len(records)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return str(v)


class ResumableRun:
    """Glue between execute(), the writer and the engine: journal, skipped shards, merged statistics."""

    def __init__(self, plan: MergePlan, out_dir: Path, resume: bool):
        self.plan = plan
        self.out_dir = Path(out_dir)
        self.fingerprint = plan_fingerprint(plan)
        self.state = load_resume_state(plan, self.out_dir, self.fingerprint) if resume else ResumeState()
        self.journal: Journal | None = None

    def writer(self, shards) -> ShardedWriter:
        reuse = self.state.reuse if self.state.reuse else None
        w = ShardedWriter(
            self.out_dir, shards, reuse=reuse, on_shard_done=self._shard_done,
            partial=self.state.partial, on_piece_done=self._piece_done,
        )  # fmt: skip
        w.manifest_extra = {"plan_fingerprint": self.fingerprint}
        self.journal = Journal(w.tmp / JOURNAL, self.plan)
        self.journal.start(self.fingerprint, self.state.records)
        self.journal.resume_from(self.state.partial, self.state.stats)
        return w

    def _piece_done(self, fname: str, count: int, end: int, sha256: str) -> None:
        assert self.journal is not None
        self.journal.piece_done(fname, count, end, sha256)

    def _shard_done(self, fname: str, sha256: str, size: int) -> None:
        assert self.journal is not None
        self.journal.shard_done(fname, sha256, size)

    def reused_jobs(self) -> list[int]:
        """plan.jobs positions whose output an interrupted run wrote and this one keeps."""
        out = [j for s in self.plan.shards if s.filename in self.state.reuse for j in s.jobs]
        p = self.state.partial
        if p is not None:
            out += next(s.jobs[: p.count] for s in self.plan.shards if s.filename == p.filename)
        return out

    def engine_options(self, options):
        skip = frozenset(self.reused_jobs())
        assert self.journal is not None
        if options.progress is not None and skip:  # the progress bar starts where the last run stopped
            from merge_cli.engine.jobs import job_inputs_bytes

            for i in sorted(skip):
                options.progress(self.plan.jobs[i], job_inputs_bytes(self.plan, self.plan.jobs[i]))
        return dataclasses.replace(options, skip_jobs=skip, on_stats=self.journal.record_stats)

    def complete(self, result) -> None:
        """Make an engine result describe the whole merge: per-tensor statistics in plan order (journaled ones
        for reused tensors) and bytes read/written counting the reused jobs, so the report and card of a
        resumed merge match an uninterrupted one (only the timings differ)."""
        reused = self.reused_jobs()
        if not reused:
            return
        from merge_cli.engine.jobs import job_inputs_bytes

        by_name = {t["name"]: t for t in result.tensors}
        by_name.update(self.state.stats)
        result.tensors = [by_name[j.name] for j in self.plan.jobs]
        for j in reused:
            result.bytes_read += job_inputs_bytes(self.plan, self.plan.jobs[j])
            result.bytes_written += self.plan.jobs[j].nbytes

    @property
    def reused(self) -> int:
        return len(self.state.reuse)

    def abort(self, writer: ShardedWriter, error: BaseException) -> bool:
        """Clean up after a failed run; returns True when the temporary folder is kept for --resume."""
        resumable = isinstance(error, (KeyboardInterrupt, WriteError))
        if isinstance(error, MergeCliError) and not isinstance(error, WriteError):
            resumable = False
        has_work = bool(self.state.reuse or self.state.partial) or bool(
            self.journal and self.journal.completed
        )
        keep = resumable and has_work
        writer.abort(keep=keep)
        return keep


def already_complete(out_dir: Path, plan: MergePlan) -> bool:
    """True when out_dir is this plan's finished merge: no temporary folder left, the manifest carries the
    plan's fingerprint, and every file matches the manifest."""
    from merge_cli.output.verify import VerifyResult, check_manifest

    out_dir = Path(out_dir)
    if not out_dir.is_dir() or temp_dir_for(out_dir).exists():
        return False
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(manifest, dict) or manifest.get("plan_fingerprint") != plan_fingerprint(plan):
        return False
    result = VerifyResult()
    check_manifest(out_dir, result)
    return not result.problems


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While merging, SIGTERM (a scheduler's stop) acts like Ctrl-C: stop promptly, keep completed shards."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
