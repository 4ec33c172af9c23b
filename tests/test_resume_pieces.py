"""Issue 15.3: a killed merge loses at most what was written since the last checkpoint of the shard in
flight, not that whole shard. One big shard, checkpoints after every tensor (the hook lowers
CHECKPOINT_BYTES), interrupts and SIGKILLs midway: --resume keeps the journaled tensors, recomputes only
the rest, and the output is bitwise identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import run_cli
from rel_helpers import assert_same_output, interrupt_after, small_family, spy_whole

from merge_cli.engine import TEST_DELAY_ENV
from merge_cli.io import writer as writer_mod
from merge_cli.io.writer import JOURNAL, temp_dir_for

ONE_SHARD = ["--shard-size", "1GB"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("pieces"))


@pytest.fixture(scope="module")
def reference(fam, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    res = run_cli("run", fam["recipe"], out, "-q", *ONE_SHARD)
    assert res.exit_code == 0, res.stderr
    return out


def pieces(tmp) -> list[dict]:
    """The journal's piece lines, up to a torn last line (a SIGKILL can cut one)."""
    out = []
    for line in (tmp / JOURNAL).read_text().splitlines()[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if "piece" in rec:
            out.append(rec)
    return out


def total_jobs(fam) -> int:
    res = run_cli("plan", fam["recipe"], "--json", *ONE_SHARD)
    return len(json.loads(res.stdout)["jobs"])


def test_ctrl_c_mid_shard_keeps_its_journaled_tensors(fam, reference, tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", temp_dir_for(tmp_path / "out")
    monkeypatch.setattr(writer_mod, "CHECKPOINT_BYTES", 1)  # a checkpoint after every tensor
    interrupt_after(monkeypatch, 12)
    res = run_cli("run", fam["recipe"], out, "-q", *ONE_SHARD)
    assert res.exit_code == 130
    kept = pieces(tmp)
    assert kept and kept[-1]["piece"] == "model.safetensors"
    done = kept[-1]["count"]
    assert 0 < done <= 12
    assert (tmp / "model.safetensors").is_file()  # the unfinished shard stays, for its journaled part
    monkeypatch.undo()
    calls = spy_whole(monkeypatch)
    res = run_cli("run", fam["recipe"], out, "-q", "--resume", *ONE_SHARD)
    assert res.exit_code == 0, res.stderr
    assert (
        f"resuming: 0 of 1 shard(s) already complete and verified, and {done} tensor(s) of model.safetensors"
        in res.stderr
    )
    assert calls[0] == total_jobs(fam) - done  # only the rest was computed
    assert_same_output(reference, out)


def test_a_damaged_prefix_falls_back_to_the_last_piece_that_still_hashes(
    fam, reference, tmp_path, monkeypatch
):
    out, tmp = tmp_path / "out", temp_dir_for(tmp_path / "out")
    monkeypatch.setattr(writer_mod, "CHECKPOINT_BYTES", 1)
    interrupt_after(monkeypatch, 12)
    assert run_cli("run", fam["recipe"], out, "-q", *ONE_SHARD).exit_code == 130
    kept = pieces(tmp)
    assert len(kept) >= 3
    # damage one byte inside the second-to-last piece: only the pieces before it still verify
    at = kept[-2]["end"] - 1
    shard = tmp / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    good = kept[-3]["count"]
    monkeypatch.undo()
    calls = spy_whole(monkeypatch)
    res = run_cli("run", fam["recipe"], out, "-q", "--resume", *ONE_SHARD)
    assert res.exit_code == 0, res.stderr
    assert f"and {good} tensor(s) of model.safetensors" in res.stderr
    assert calls[0] == total_jobs(fam) - good
    assert_same_output(reference, out)


def test_sigkill_mid_shard_then_resume(fam, reference, tmp_path):
    out, tmp = tmp_path / "out", temp_dir_for(tmp_path / "out")
    env = {**os.environ, TEST_DELAY_ENV: "0.1", "MERGE_CLI_TEST_CHECKPOINT_BYTES": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "merge_cli", "run", str(fam["recipe"]), str(out), "-q", *ONE_SHARD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp / JOURNAL).exists() and len(pieces(tmp)) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the merge finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = pieces(tmp)[-1]["count"]
    res = run_cli("run", fam["recipe"], out, "-q", "--resume", *ONE_SHARD)
    assert res.exit_code == 0, res.stderr
    assert (
        f"and {done} tensor(s) of model.safetensors" in res.stderr
        or f"and {done + 1} tensor(s)" in res.stderr
    )
    assert_same_output(reference, out)
