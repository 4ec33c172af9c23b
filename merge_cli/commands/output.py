"""Commands over a finished output folder: verify, emr-materialize."""

from __future__ import annotations

from pathlib import Path

import typer

from merge_cli.commands.common import handle_errors


@handle_errors
def verify(
    out_dir: Path = typer.Argument(..., help="A folder written by `merge-cli run`."),
    no_finite: bool = typer.Option(
        False, "--no-finite", help="Skip reading every tensor to check for NaN/Inf."
    ),
):
    """Check a merged model: manifest hashes and sizes, index against shards, shapes against config, finiteness."""
    from merge_cli.output.verify import verify_output

    summary = verify_output(out_dir, check_finite=not no_finite)
    print(f"ok: {out_dir}: {summary}")


@handle_errors
def emr_materialize(
    out_dir: Path = typer.Argument(
        ..., help="Output folder of an emr merge (holds emr/emr.json and the masks)."
    ),
    task: int = typer.Argument(..., help="Task index, 0-based, in the recipe's models order."),
    new_out: Path = typer.Argument(..., help="Folder for the task's model (created)."),
    overwrite: bool = typer.Option(False, help="Replace an existing folder."),
):
    """Write one task's model from an EMR merge: base + rescaler * mask * (unified - base)."""
    from merge_cli.merge.emr import materialize

    final = materialize(out_dir, task, new_out, overwrite)
    print(f"wrote task {task} of {out_dir} to {final}")
