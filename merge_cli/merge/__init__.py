"""One merge, end to end: plan -> output checks -> engine -> side files, report, card -> atomic rename."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from merge_cli.engine import EngineOptions, EngineResult, run_merge
from merge_cli.engine.resume import ResumableRun
from merge_cli.io.lock import LOCK_NAME, dump_lock
from merge_cli.io.writer import ShardedWriter, check_output
from merge_cli.merge.inputs import prepare_inputs
from merge_cli.output import plots
from merge_cli.output.card import model_card
from merge_cli.output.report import build_report, report_markdown
from merge_cli.output.run_stats import plan_experts
from merge_cli.output.sidefiles import write_side_files
from merge_cli.plan import MergePlan


@dataclass
class MergeOutcome:
    out_dir: Path
    engine: EngineResult
    report: dict
    shards_reused: int = 0
    note: str = ""


def shard_entries(plan: MergePlan) -> list[tuple[str, list[tuple[str, str, tuple[int, ...], int]]]]:
    return [
        (
            s.filename,
            [
                (plan.jobs[i].name, plan.jobs[i].out_dtype, plan.jobs[i].shape, plan.jobs[i].nbytes)
                for i in s.jobs
            ],
        )
        for s in plan.shards
    ]


def writer_for(plan: MergePlan, out_dir: Path) -> ShardedWriter:
    return ShardedWriter(out_dir, shard_entries(plan))


def execute(
    plan: MergePlan,
    out_dir: Path,
    *,
    overwrite: bool = False,
    options: EngineOptions | None = None,
    locked: dict | None = None,
    lock_path: Path | str = "lock",
    resume: bool = False,
) -> MergeOutcome:
    """Run a merge into out_dir. A journal of completed shards makes it resumable (see resume.py): an
    interrupt or a write error keeps the temporary folder; `resume=True` reuses its verified shards."""
    out_dir = Path(out_dir)
    check_output(out_dir, [Path(m.path) for m in plan.models], overwrite)
    if (options or EngineOptions()).fused != "off":  # a first run builds the native kernels meanwhile
        from merge_cli.kernels import native

        native.warm_up()
    plots.preload()  # merge_report.html is drawn at the end: its imports overlap the merge
    # issue 7 (hub, lock, side files, card): merge_cli/merge/inputs.py
    hub = prepare_inputs(plan, locked, lock_path)
    run = ResumableRun(plan, out_dir, resume)
    writer = run.writer(shard_entries(plan))
    # What exists now (modules, the plan) lives for the whole merge: frozen out of the cyclic collector,
    # whose full collections would otherwise walk it again and again while the tensors stream (~4% of a
    # merge's CPU). Objects made later are collected as usual; unfrozen when the merge ends, so a process
    # that runs many merges (stages, tests, a library user) can still collect what they leave behind.
    gc.freeze()
    try:
        result = run_merge(plan, writer, run.engine_options(options or EngineOptions()))
        run.complete(result)
        writer.write_index({"merged_by": "merge-cli"})
        if plan.config is not None:
            writer.write_json("config.json", plan.config)
        plan.notes.extend(write_side_files(plan, writer, hub.side_files, hub.template))
        engine = {
            "seconds": round(result.seconds, 3),
            "device": result.device,
            "kernels": result.kernels,
            "bytes_read": result.bytes_read,
            "bytes_written": result.bytes_written,
            "shards_reused": run.reused,
        }
        if result.stats_passes:
            engine["stats_passes"] = result.stats_passes
            engine["whole_model"] = result.whole_model
        report = build_report(plan, result.tensors, engine)
        report["experts"] = plan_experts(plan)  # the labels of task_vector_norms (the HTML report's axes)
        recipe_text = plan.recipe.path.read_text() if plan.recipe.path else ""
        writer.write_text("recipe.yaml", recipe_text)
        writer.write_text("merge_report.json", json.dumps(report, indent=1) + "\n")
        writer.write_text("merge_report.md", report_markdown(report))
        lock = hub.finish_lock(writer)
        writer.write_text(LOCK_NAME, dump_lock(lock))
        html_note = write_html_report(writer, report, recipe_text, lock)
        writer.write_text("README.md", model_card(plan, recipe_text, report, lock, hub.front))
        final = writer.finish(overwrite)
    except BaseException as e:
        if run.abort(writer, e):
            e.partial_kept = writer.tmp  # the CLI tells how to resume
        raise
    finally:
        gc.unfreeze()
    note = "\n".join(n for n in (run.state.note, html_note) if n)
    return MergeOutcome(final, result, report, run.reused, note)


def write_html_report(writer, report: dict, recipe_text: str, lock: dict) -> str:
    """merge_report.html beside the JSON (issue 18). A failure to draw it never fails the merge: the JSON
    and Markdown are written, and the returned note says how to redraw it."""
    from merge_cli.output.html_report import merge_report_html

    try:
        page = merge_report_html(report, recipe_text, lock)
    except Exception as e:  # a plotting bug must not lose a finished merge (write errors still stop it)
        return f"merge_report.html was not written ({type(e).__name__}: {e}); `merge-cli report OUT_DIR` redraws it"
    writer.write_text("merge_report.html", page)
    return ""
