"""Issue 6.4: SIGKILL a merge at random moments; `--resume` must finish it bitwise identical to a clean run.

Each merge runs the real command line (`merge_cli.cli.main`) in its own process, forked from a forkserver
that imported torch once, so that 20+ kill points fit in seconds instead of paying torch's import each
time. The engine's test hook MERGE_CLI_TEST_DELAY_PER_TENSOR slows the merge so kills land in every
phase: before the temporary folder exists, mid-shard, between a shard and its journal line, during
the side files and manifest, and after the final rename.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time

import pytest
from rel_helpers import assert_same_output, cli_child, small_family

from merge_cli.engine import TEST_DELAY_ENV
from merge_cli.io.writer import JOURNAL, temp_dir_for

KILL_POINTS = 26
DELAY = "0.01"  # seconds per tensor in the killed runs
SEED = 20261124


@pytest.fixture(scope="module")
def ctx():
    c = multiprocessing.get_context("forkserver")
    c.set_forkserver_preload(
        ["torch", "merge_cli.cli", "merge_cli.merge", "merge_cli.plan", "merge_cli.render"]
    )
    return c


def start(ctx, argv, delay: str | None = None):
    env = {TEST_DELAY_ENV: delay} if delay else {TEST_DELAY_ENV: ""}
    p = ctx.Process(target=cli_child, args=([str(a) for a in argv], env))
    p.start()
    return p


def finish(p, timeout: float = 120) -> int:
    p.join(timeout)
    assert not p.is_alive(), "a merge hung"
    return p.exitcode


def phase(out, tmp) -> str:
    if out.exists():
        return "after rename"
    if not tmp.exists():
        return "before start"
    j = tmp / JOURNAL
    if not j.exists():
        return "before journal"
    lines = j.read_bytes().count(b"\n") - 1
    shards = len(list(tmp.glob("*.safetensors")))
    if (tmp / "manifest.json").exists() or (tmp / "README.md").exists():
        return "side files"
    if shards > lines:
        return "mid shard"
    return "between shards"


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(ctx, tmp_path):
    fam = small_family(tmp_path / "models")
    recipe = fam["recipe"]
    ref = tmp_path / "ref"
    assert finish(start(ctx, ["--version"])) == 0  # the forkserver starts (and imports torch) once, here
    t0 = time.monotonic()
    assert finish(start(ctx, ["run", recipe, ref, "-q"], DELAY)) == 0
    duration = time.monotonic() - t0  # a slowed, uninterrupted run: kills are drawn over this span
    rng = random.Random(SEED)
    seen: dict[str, int] = {}
    killed = 0
    for k in range(KILL_POINTS):
        out = tmp_path / f"out{k}"
        tmp = temp_dir_for(out)
        p = start(ctx, ["run", recipe, out, "-q"], DELAY)
        # two kills in three anywhere in the run, one in three near its end (side files, manifest, rename)
        time.sleep(rng.uniform(0.0, duration) if k % 3 else rng.uniform(0.8 * duration, 1.1 * duration))
        p.kill()
        code = finish(p)
        killed += code == -9
        where = phase(out, tmp) if code == -9 else "finished"
        seen[where] = seen.get(where, 0) + 1
        assert finish(start(ctx, ["run", recipe, out, "-q", "--resume"])) == 0, (
            f"resume after kill {k} ({where})"
        )
        assert not tmp.exists()
        assert_same_output(ref, out)
    summary = {"kill_points": KILL_POINTS, "killed": killed, "phases": seen}
    (tmp_path / "kill_summary.json").write_text(json.dumps(summary))
    print("kill-and-resume:", summary, f"reference run {duration:.2f} s")
    assert killed >= 20, summary
