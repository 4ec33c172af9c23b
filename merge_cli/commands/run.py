"""`merge-cli run`: plan, stream every tensor through its method, write the model, card and report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import ALLOW_PICKLE_HELP, fail, handle_errors, load_recipe_arg, size_arg


@handle_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out_dir: Path = typer.Argument(..., help="Output folder (created; must not exist unless --overwrite)."),
    device: str = typer.Option("auto", help="Compute device: auto (CUDA when present), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(
        None,
        min=1,
        help="Torch compute threads (default: 1 when every tensor runs on the blocked CPU kernels, else all cores).",
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an existing output folder (only once the new one is complete)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar; one summary line (for CI logs)."
    ),
    shard_size: Optional[str] = typer.Option(
        None, help="Output shard size, e.g. 5GB or 500MB (overrides the recipe)."
    ),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (overrides the recipe)."),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
    intermediate_dir: Optional[Path] = typer.Option(
        None,
        help="Multi-stage recipes: folder of the named stages' outputs (default: OUT_DIR.intermediate beside it).",
    ),
    max_memory: Optional[str] = typer.Option(
        None,
        help="Memory budget, e.g. 4GB: bigger tensors are merged in row chunks (default: 1/8 of free RAM, 1-16 GB).",
    ),
    locked: Optional[Path] = typer.Option(
        None,
        "--locked",
        help="A recipe.lock.yaml: pin hub models to its commits and refuse to run if any input differs.",
    ),
    fused: str = typer.Option(
        "auto",
        help="Fast CPU kernels for linear, task_arithmetic, ties, dare_* and breadcrumbs* (native C when a compiler is "
        "found, else cache-blocked torch; bitwise equal to the plain ones): auto/on, off.",
    ),
    resume: bool = typer.Option(
        False, help="Continue an interrupted run into OUT_DIR, reusing its completed, verified shards."
    ),
    allow_nonfinite: bool = typer.Option(False, help="Merge even when a source tensor holds NaN or Inf."),
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Merge: plan, stream every tensor through its method, write a sharded HF model with card and report."""
    from merge_cli.commands.render import progress_bar
    from merge_cli.engine import EngineOptions
    from merge_cli.engine.resume import already_complete, resume_hint, sigterm_as_interrupt
    from merge_cli.io.hub import pinned
    from merge_cli.io.lock import hub_pins, load_lock
    from merge_cli.io.writer import WriteError, check_output
    from merge_cli.merge import execute
    from merge_cli.merge.stages import run_stages
    from merge_cli.plan import build_plan
    from merge_cli.recipe.stages import is_multi_stage
    from merge_cli.skillpack.twin import is_twin_recipe

    if is_twin_recipe(recipe):  # issue 16: Twin-Merging writes a shared model and one pack per expert
        from merge_cli.engine import default_max_memory
        from merge_cli.skillpack.twin import load_twin_recipe, twin

        res = twin(**load_twin_recipe(recipe), out_dir=out_dir, overwrite=overwrite,
                   max_memory=size_arg(max_memory, "--max-memory") or default_max_memory())  # fmt: skip
        print(f"twin: wrote {res['shared']} and {len(res['packs'])} exclusive pack(s) in {out_dir}; "
              f"`merge-cli pack apply {res['shared']} PACKS... OUT --weights NAME=1` gives one expert's model")  # fmt: skip
        return

    if is_multi_stage(recipe):
        done = run_stages(
            recipe, out_dir, intermediate_dir=intermediate_dir, overwrite=overwrite,
            options=EngineOptions(device=device, threads=threads, max_memory=size_arg(max_memory, "--max-memory")),
            plan_kwargs={"allow_arch_mismatch": allow_arch_mismatch, "shard_size": size_arg(shard_size), "allow_pickle": allow_pickle},
            overrides={"seed": seed} if seed is not None else None, log=lambda m: print(m, flush=True),
        )  # fmt: skip
        print(
            f"ran {len(done)} stage(s) ({sum(d == 'reused' for _, d in done)} reused); final model in {out_dir}"
        )
        return

    lock = load_lock(locked) if locked else None
    with pinned(hub_pins(lock) if lock else {}):
        p = build_plan(
            load_recipe_arg(recipe, seed),
            allow_arch_mismatch=allow_arch_mismatch,
            shard_size=size_arg(shard_size),
            allow_pickle=allow_pickle,
        )
    if resume and already_complete(out_dir, p):
        p.close()
        print(f"nothing to resume: {out_dir} is complete and matches its manifest")
        return
    opts = EngineOptions(
        device=device,
        threads=threads,
        max_memory=size_arg(max_memory, "--max-memory"),
        fused=fused,
        allow_nonfinite=allow_nonfinite,
    )
    try:
        check_output(out_dir, [Path(m.path) for m in p.models], overwrite)  # before any progress bar shows
        with sigterm_as_interrupt(), progress_bar(p, disable=quiet) as advance:
            opts.progress = advance
            opts.on_pass = None if quiet else _print_pass
            outcome = execute(
                p,
                out_dir,
                overwrite=overwrite,
                options=opts,
                locked=lock,
                lock_path=locked or "lock",
                resume=resume,
            )
    except KeyboardInterrupt as err:
        kept = getattr(err, "partial_kept", None)
        where = f"completed shards are kept in {kept}; " if kept else ""
        print(
            f"interrupted: {out_dir} was not written; {where}{resume_hint(recipe, out_dir)}", file=sys.stderr
        )
        raise typer.Exit(130) from None
    except WriteError as err:
        kept = getattr(err, "partial_kept", None)
        where = f"; completed shards are kept in {kept}" if kept else ""
        fail(f"{err}{where}; {out_dir} was not written; {resume_hint(recipe, out_dir)}")
    finally:
        p.close()
    if outcome.note:
        print(outcome.note, file=sys.stderr)
    e = outcome.engine
    print(
        f"merged {len(p.jobs)} tensors into {outcome.out_dir} ({len(p.shards)} shard(s), "
        f"{e.bytes_written / 1e9:.3f} GB) in {e.seconds:.1f} s on {e.device} ({e.kernels}); report: {outcome.out_dir / 'merge_report.json'}"
    )
    if lock is not None and lock.get("output"):
        from merge_cli.io.lock import LOCK_NAME

        same = load_lock(outcome.out_dir / LOCK_NAME).get("output") == lock["output"]
        print(
            f"locked rebuild: output {'is bitwise identical to' if same else 'DIFFERS from'} the locked build's"
        )


def _print_pass(rec: dict) -> None:
    print(
        f"statistics pass {rec['pass']} ({rec['what']}): {rec['seconds']:.1f} s", file=sys.stderr, flush=True
    )
