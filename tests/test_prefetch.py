"""Read-ahead for cold page caches: the reader asks the kernel (fadvise WILLNEED) for the bytes of the next
jobs' inputs, a bounded amount ahead, while it maps the current job's; the merge's bits do not depend on it.
And the merge's other streaming aid: the objects alive when it starts are frozen out of the cyclic collector
while it runs, and given back to it when it ends."""

from __future__ import annotations

import gc
import os

import torch
from helpers import merge_in_process, write_model, write_recipe

from merge_cli.engine import pipeline
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe


def _models(tmp_path):
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    base = write_model(tmp_path / "base", {n: torch.randn(64, 32, generator=g) for n in names})
    ex = write_model(tmp_path / "ex", {n: torch.randn(64, 32, generator=g) for n in names})
    recipe = write_recipe(
        tmp_path / "r.yaml", f"base_model: {base}\nmodels: [{ex}]\nmethod: task_arithmetic\n"
    )
    return recipe, names


def test_prefetch_asks_for_each_tensor_range_a_bounded_amount_ahead(tmp_path, monkeypatch):
    recipe, names = _models(tmp_path)
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, n, advice: asked.append((start, n)))
    plan = build_plan(load_recipe(recipe))
    try:
        ck = plan.models[0].checkpoint
        info = ck.info(names[0])
        assert ck.prefetch(names[0]) == info.nbytes == 64 * 32 * 4
        assert asked == [(info.start, info.nbytes)]
        asked.clear()
        monkeypatch.setattr(pipeline._Prefetch, "AHEAD", 3 * 64 * 32 * 4)  # room for one job and a half
        ahead = pipeline._Prefetch(plan, skip={2})
        ahead.advance(0)  # jobs 1 and 2 (skipped) are looked at; job 1's two inputs fill the window
        first = list(ahead.asked)
        ahead.advance(1)
        jobs = [j for j, _ in ahead.asked]
    finally:
        plan.close()
    assert [j for j, _ in first] == [1, 3] and 2 not in jobs
    assert all(j > 1 for j in jobs) and len(asked) == 2 * (len(first) + len(jobs) - 1)


def test_merges_are_the_same_with_and_without_read_ahead(tmp_path, monkeypatch):
    recipe, _ = _models(tmp_path)
    a, _ = merge_in_process(tmp_path, recipe, "with")
    monkeypatch.setattr(pipeline._Prefetch, "AHEAD", 0)
    b, _ = merge_in_process(tmp_path, recipe, "without")
    assert len(a) == 6 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_objects_are_frozen_during_the_merge_only(tmp_path, monkeypatch):
    recipe, _ = _models(tmp_path)
    seen: list[int] = []
    real = pipeline._run_merge

    def spy(*a, **kw):
        seen.append(gc.get_freeze_count())
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "_run_merge", spy)
    merge_in_process(tmp_path, recipe, "frozen")
    assert seen and seen[0] > 0  # frozen while the tensors stream
    assert gc.get_freeze_count() == 0  # and given back to the collector afterwards
