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
from merge_cli.engine.journal import JOURNAL_FORMAT, Journal, read_journal, verified_piece
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
from merge_cli.plan import MergePlan


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
    header, records = read_journal(tmp / JOURNAL)
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
    state.partial, pieces = verified_piece(tmp, records, names, state.reuse)
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
