"""A first run on a fresh machine keeps its one-off costs off the merge's critical path: the native kernels
build on a background thread (warm_up) while the merge plans and reads, and the lock's input hashes run
beside the merge at a lower CPU priority, one thread per core."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from helpers import write_model, write_recipe

from merge_cli.io import lock as lockmod
from merge_cli.kernels import native
from merge_cli.merge import execute
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native as in a new process with an empty kernel cache; afterwards the normal cache is reloaded."""
    monkeypatch.setenv("MERGE_CLI_CACHE", str(tmp_path / "kcache"))
    monkeypatch.setattr(native, "_resolved", threading.Event())
    monkeypatch.setattr(native, "_started", [])
    monkeypatch.setattr(native, "build_seconds", [])
    monkeypatch.setattr(native, "_why", [])
    native.lib.cache_clear()
    yield tmp_path / "kcache"
    native.lib.cache_clear()


@pytest.mark.skipif(native.lib() is None, reason=f"no native kernels: {native.unavailable_reason()}")
def test_warm_up_builds_in_the_background_once(fresh_build):
    assert not native.ready()
    native.warm_up()
    thread = native._started[0]
    assert thread.name == "merge-cli-native-build" and thread.daemon
    native.warm_up()  # a second call starts nothing more
    assert len(native._started) == 1
    so = native.lib()  # waits for the background build rather than compiling again
    thread.join()
    assert so is not None and native.ready()
    assert len(list(fresh_build.glob("kernels-*.so"))) == 1
    assert len(native.build_seconds) == 1 and native.build_seconds[0] > 0


def test_lock_hashes_at_low_priority_beside_the_merge(tmp_path, monkeypatch):
    """The hashing threads (one per core, at most one per file) run at nice +10 (Linux sets it per thread)
    while the merge runs; result() (the merge is done) gives each its own priority back for the rest; the
    lock is the synchronous one."""
    before: list[int] = []
    after: list[int] = []
    names: set[str] = set()
    restored: list[int] = []
    first, go = threading.Event(), threading.Event()
    real_hash, real_nice = lockmod.sha256_file, lockmod._nice

    def prio() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def spy(path):
        name = threading.current_thread().name
        if name.startswith("merge-cli-lock"):  # (the recipe is hashed up front)
            names.add(name)
            before.append(prio())
            first.set()
            go.wait(30)  # every file waits until result() has restored every thread's priority
            after.append(prio())
        return real_hash(path)

    own = os.getpriority(os.PRIO_PROCESS, 0)

    def nice(tid, value):
        real_nice(tid, value)
        if value == own:
            restored.append(tid)
            if len(restored) == len(builder._tids):
                go.set()

    g = torch.Generator().manual_seed(1)
    base = write_model(tmp_path / "base", {"model.norm.weight": torch.randn(16, generator=g)})
    ex = write_model(tmp_path / "ex", {"model.norm.weight": torch.randn(16, generator=g)})
    recipe = write_recipe(
        tmp_path / "r.yaml", f"base_model: {base}\nmodels: [{ex}]\nmethod: task_arithmetic\n"
    )
    plan = build_plan(load_recipe(recipe))
    try:
        want = lockmod.LockBuilder(plan).hash()
        monkeypatch.setattr(lockmod, "sha256_file", spy)
        monkeypatch.setattr(lockmod, "_nice", nice)
        builder = lockmod.LockBuilder(plan).start()
        assert first.wait(30)
        got = builder.result()
    finally:
        plan.close()
    assert got == want
    workers = min(os.cpu_count() or 1, len(builder._paths()))  # one thread per core, at most one per file
    assert len(builder._threads) == workers and 1 <= len(names) <= workers
    assert len(after) == len(builder._paths()) and before[0] == min(19, own + 10)
    if os.geteuid() == 0:  # raising a priority back needs root (or RLIMIT_NICE)
        assert all(p == own for p in after)


def test_a_merge_starts_the_build_and_reports_it(tmp_path, fresh_build):
    """execute() starts the background build before planning the inputs; the merge says which kernels ran."""
    g = torch.Generator().manual_seed(2)
    base = write_model(tmp_path / "base", {"model.norm.weight": torch.randn(64, generator=g).bfloat16()})
    ex = write_model(tmp_path / "ex", {"model.norm.weight": torch.randn(64, generator=g).bfloat16()})
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ex}\n    parameters: {{density: 0.5}}\n"
        "dtype: bfloat16\n",
    )
    plan = build_plan(load_recipe(recipe))
    try:
        out = execute(plan, tmp_path / "out")
    finally:
        plan.close()
    assert native._started, "the build was not started in the background"
    assert out.engine.kernels == native_label()


def native_label() -> str:
    return "native" if native.lib() is not None else (
        f"plain kernels: bf16 compute needs the native kernels ({native.unavailable_reason()})"
    )  # fmt: skip
