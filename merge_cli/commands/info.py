"""Commands that describe: methods (the registry), inspect (a checkpoint's headers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import ALLOW_PICKLE_HELP, handle_errors, out


@handle_errors
def methods(name: Optional[str] = typer.Argument(None, help="A method to describe in full.")):
    """List the merge methods, or describe one: its parameters, defaults, ranges and paper."""
    from merge_cli.commands.render import print_method, print_methods
    from merge_cli.methods import METHODS, get_method

    if name is None:
        print_methods(METHODS, out)
    else:
        print_method(get_method(name, "merge-cli methods"), out)


@handle_errors
def inspect(
    model: str = typer.Argument(..., help="A model folder or .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Describe a checkpoint from its headers: layers, module groups, dtypes, sizes, tied embeddings."""
    from merge_cli.commands.render import describe_checkpoint, print_checkpoint
    from merge_cli.io.refs import open_checkpoint

    ck = open_checkpoint(model, Path.cwd(), allow_pickle=allow_pickle)
    try:
        info = describe_checkpoint(ck)
        if as_json:
            print(json.dumps(info, indent=1))
        else:
            print_checkpoint(info, out)
    finally:
        ck.close()
