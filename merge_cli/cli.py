"""merge-cli command line: the typer app and its commands' registration, nothing else.

Each command lives in merge_cli/commands/ (one module per family); this file only names them.
Exit codes: 0 success, 2 user error (one line on stderr, no traceback), 1 internal error (a bug).
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from merge_cli import __version__
from merge_cli.commands import analyze, generate, hub, info, output, pack, recipe, report, run, tune

app = typer.Typer(
    name="merge-cli",
    help="Fuse neural-network checkpoints from YAML recipes.\n\n"
    "Typical flow: `merge-cli validate recipe.yaml`, `merge-cli plan recipe.yaml`, then "
    "`merge-cli run recipe.yaml OUT_DIR`. `merge-cli methods` lists the merge methods.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        print(f"merge-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
):
    pass


COMMANDS = [
    ("validate", recipe.validate),
    ("plan", recipe.plan),
    ("run", run.run),
    ("emr-materialize", output.emr_materialize),
    ("verify", output.verify),
    ("convert", recipe.convert),
    ("methods", info.methods),
    ("inspect", info.inspect),
    ("lock", hub.lock),
    ("push", hub.push),
    ("check", hub.check),
    ("tune", tune.tune),
    ("analyze", analyze.analyze),
    ("report", report.report),
    ("generate", generate.generate),
]
for _name, _fn in COMMANDS:
    app.command(_name)(_fn)
app.add_typer(pack.app, name="pack")  # issue 16: SkillPacks


def main() -> None:
    # Idle OpenMP workers sleep instead of spinning (read before torch loads libgomp): a spinning worker
    # takes the core the reader/writer threads need, and a descheduled one stalls every op (tested: a
    # 2-thread linear merge on a busy 2-core machine went from 7 s to 145 s without this).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
