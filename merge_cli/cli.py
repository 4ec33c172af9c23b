"""merge-cli command line: thin commands over recipe -> plan -> engine -> writer.

Exit codes: 0 success, 2 user error (one line on stderr, no traceback), 1 internal error (a bug).
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from merge_cli import __version__
from merge_cli.errors import MergeCliError

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
out = Console(highlight=False)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """User errors -> one line + exit 2; Ctrl-C -> exit 130; anything else is a bug -> traceback + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeCliError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            print("interrupted: nothing was written to the output folder", file=sys.stderr)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception:
            traceback.print_exc()
            print("internal error: this is a bug in merge-cli; please report it with the lines above", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        print(f"merge-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


def _load(recipe: Path, seed: Optional[int] = None):
    from merge_cli.recipe import load_recipe

    return load_recipe(recipe, {"seed": seed} if seed is not None else None)


def _size(value: Optional[str], option: str = "--shard-size") -> Optional[int]:
    if value is None:
        return None
    from merge_cli.recipe import parse_size

    return parse_size(value, option)


@app.command()
@handle_errors
def validate(recipe: Path = typer.Argument(..., help="Recipe YAML file.")):
    """Check a recipe without opening any model: keys, methods, parameter names and ranges."""
    r = _load(recipe)
    n = len(r.models) or sum(len(s.sources) for s in r.slices)
    print(f"ok: {recipe} is a valid {r.method} recipe over {n} model reference(s)")


@app.command()
@handle_errors
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole plan, one entry per tensor, as JSON."),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
    shard_size: Optional[str] = typer.Option(None, help="Output shard size, e.g. 5GB or 500MB (overrides the recipe)."),
):
    """Plan a merge from safetensors headers alone (no weight is read) and print a summary."""
    from merge_cli.plan import build_plan
    from merge_cli.render import print_plan

    p = build_plan(_load(recipe), allow_arch_mismatch=allow_arch_mismatch, shard_size=_size(shard_size))
    try:
        if as_json:
            print(json.dumps(p.to_json(), indent=1))
        else:
            print_plan(p, out)
    finally:
        p.close()


@app.command()
@handle_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    out_dir: Path = typer.Argument(..., help="Output folder (created; must not exist unless --overwrite)."),
    device: str = typer.Option("auto", help="Compute device: auto (CUDA when present), cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch compute threads (default: all cores)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder (only once the new one is complete)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; one summary line (for CI logs)."),
    shard_size: Optional[str] = typer.Option(None, help="Output shard size, e.g. 5GB or 500MB (overrides the recipe)."),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (overrides the recipe)."),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
    max_memory: Optional[str] = typer.Option(
        None, help="Memory budget, e.g. 4GB: bigger tensors are merged in row chunks (default: 1/8 of free RAM, 1-16 GB)."
    ),
    locked: Optional[Path] = typer.Option(
        None, "--locked", help="A recipe.lock.yaml: pin hub models to its commits and refuse to run if any input differs."
    ),
    fused: str = typer.Option(
        "auto", help="Compiled CPU kernels for linear/task_arithmetic/ties: auto (merges over 50M elements), on, off."
    ),
):
    """Merge: plan, stream every tensor through its method, write a sharded HF model with card and report."""
    from merge_cli.engine import EngineOptions
    from merge_cli.io.hub import pinned
    from merge_cli.lock import hub_pins, load_lock
    from merge_cli.merge import execute
    from merge_cli.plan import build_plan
    from merge_cli.render import progress_bar

    lock = load_lock(locked) if locked else None
    with pinned(hub_pins(lock) if lock else {}):
        p = build_plan(_load(recipe, seed), allow_arch_mismatch=allow_arch_mismatch, shard_size=_size(shard_size))
    try:
        with progress_bar(p, disable=quiet) as advance:
            opts = EngineOptions(
                device=device, threads=threads, max_memory=_size(max_memory, "--max-memory"), fused=fused, progress=advance,
                on_pass=None if quiet else _print_pass,
            )  # fmt: skip
            outcome = execute(p, out_dir, overwrite=overwrite, options=opts, locked=lock, lock_path=locked or "lock")
    finally:
        p.close()
    e = outcome.engine
    print(
        f"merged {len(p.jobs)} tensors into {outcome.out_dir} ({len(p.shards)} shard(s), "
        f"{e.bytes_written / 1e9:.3f} GB) in {e.seconds:.1f} s on {e.device}; report: {outcome.out_dir / 'merge_report.json'}"
    )
    if lock is not None and lock.get("output"):
        from merge_cli.lock import LOCK_NAME

        same = load_lock(outcome.out_dir / LOCK_NAME).get("output") == lock["output"]
        print(f"locked rebuild: output {'is bitwise identical to' if same else 'DIFFERS from'} the locked build's")


def _print_pass(rec: dict) -> None:
    print(f"statistics pass {rec['pass']} ({rec['what']}): {rec['seconds']:.1f} s", file=sys.stderr, flush=True)


@app.command("emr-materialize")
@handle_errors
def emr_materialize(
    out_dir: Path = typer.Argument(..., help="Output folder of an emr merge (holds emr/emr.json and the masks)."),
    task: int = typer.Argument(..., help="Task index, 0-based, in the recipe's models order."),
    new_out: Path = typer.Argument(..., help="Folder for the task's model (created)."),
    overwrite: bool = typer.Option(False, help="Replace an existing folder."),
):
    """Write one task's model from an EMR merge: base + rescaler * mask * (unified - base)."""
    from merge_cli.emr_materialize import materialize

    final = materialize(out_dir, task, new_out, overwrite)
    print(f"wrote task {task} of {out_dir} to {final}")


@app.command()
@handle_errors
def methods(name: Optional[str] = typer.Argument(None, help="A method to describe in full.")):
    """List the merge methods, or describe one: its parameters, defaults, ranges and paper."""
    from merge_cli.methods import METHODS, get_method
    from merge_cli.render import print_method, print_methods

    if name is None:
        print_methods(METHODS, out)
    else:
        print_method(get_method(name, "merge-cli methods"), out)


@app.command()
@handle_errors
def inspect(
    model: str = typer.Argument(..., help="A model folder or .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Describe a checkpoint from its headers: layers, module groups, dtypes, sizes, tied embeddings."""
    from merge_cli.io.checkpoint import open_checkpoint
    from merge_cli.render import describe_checkpoint, print_checkpoint

    ck = open_checkpoint(model, Path.cwd())
    try:
        info = describe_checkpoint(ck)
        if as_json:
            print(json.dumps(info, indent=1))
        else:
            print_checkpoint(info, out)
    finally:
        ck.close()


from merge_cli import cli_hub  # noqa: E402,F401 - registers lock, push and check (issue 7)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
