"""The resume journal (JOURNAL in the temporary output folder): its lines, written as shards and pieces of
the shard in flight become durable, and read back by --resume (resume.py), which trusts nothing it
cannot re-hash."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from merge_cli.io.writer import PartialShard, write_failed
from merge_cli.plan import MergePlan, TensorJob

JOURNAL_FORMAT = 2  # 2: piece lines for unfinished shards


def read_journal(path: Path) -> tuple[dict | None, list[dict]]:
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


def verified_piece(
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
