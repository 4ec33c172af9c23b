"""merge-cli command line: thin commands over recipe -> plan -> engine -> writer.

Exit codes: 0 success, 2 user error (one line on stderr, no traceback), 1 internal error (a bug).
"""

from __future__ import annotations

import functools
import json
import os
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
ALLOW_PICKLE_HELP = (
    "Also load pickled pytorch_model.bin weights, with torch's weights-only loader (never arbitrary code)."
)


def one_line(text: str) -> str:
    """Control characters (a newline in a hostile tensor name or YAML key) shown escaped: errors stay one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
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
            print(
                "internal error: this is a bug in merge-cli; please report it with the lines above",
                file=sys.stderr,
            )
            raise typer.Exit(1) from None

    return wrapper


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
    from merge_cli.stages import is_multi_stage, load_stages

    if is_multi_stage(recipe):
        _, stages, _ = load_stages(recipe)
        print(f"ok: {recipe} is a valid multi-stage recipe: {', '.join(s.name or 'final' for s in stages)}")
        return
    r = _load(recipe)
    n = len(r.models) or sum(len(s.sources) for s in r.slices)
    print(f"ok: {recipe} is a valid {r.method} recipe over {n} model reference(s)")


@app.command()
@handle_errors
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the whole plan, one entry per tensor, as JSON."
    ),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
    shard_size: Optional[str] = typer.Option(
        None, help="Output shard size, e.g. 5GB or 500MB (overrides the recipe)."
    ),
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Plan a merge from safetensors headers alone (no weight is read) and print a summary."""
    from merge_cli.plan import build_plan
    from merge_cli.render import print_plan

    p = build_plan(
        _load(recipe),
        allow_arch_mismatch=allow_arch_mismatch,
        shard_size=_size(shard_size),
        allow_pickle=allow_pickle,
    )
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
    from merge_cli.engine import EngineOptions
    from merge_cli.io.hub import pinned
    from merge_cli.io.writer import WriteError, check_output
    from merge_cli.lock import hub_pins, load_lock
    from merge_cli.merge import execute
    from merge_cli.plan import build_plan
    from merge_cli.render import progress_bar
    from merge_cli.resume import already_complete, resume_hint, sigterm_as_interrupt
    from merge_cli.stages import is_multi_stage, run_stages

    if is_multi_stage(recipe):
        done = run_stages(
            recipe, out_dir, intermediate_dir=intermediate_dir, overwrite=overwrite,
            options=EngineOptions(device=device, threads=threads, max_memory=_size(max_memory, "--max-memory")),
            plan_kwargs={"allow_arch_mismatch": allow_arch_mismatch, "shard_size": _size(shard_size), "allow_pickle": allow_pickle},
            overrides={"seed": seed} if seed is not None else None, log=lambda m: print(m, flush=True),
        )  # fmt: skip
        print(
            f"ran {len(done)} stage(s) ({sum(d == 'reused' for _, d in done)} reused); final model in {out_dir}"
        )
        return

    lock = load_lock(locked) if locked else None
    with pinned(hub_pins(lock) if lock else {}):
        p = build_plan(
            _load(recipe, seed),
            allow_arch_mismatch=allow_arch_mismatch,
            shard_size=_size(shard_size),
            allow_pickle=allow_pickle,
        )
    if resume and already_complete(out_dir, p):
        p.close()
        print(f"nothing to resume: {out_dir} is complete and matches its manifest")
        return
    opts = EngineOptions(
        device=device,
        threads=threads,
        max_memory=_size(max_memory, "--max-memory"),
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
        f"{e.bytes_written / 1e9:.3f} GB) in {e.seconds:.1f} s on {e.device}; report: {outcome.out_dir / 'merge_report.json'}"
    )
    if lock is not None and lock.get("output"):
        from merge_cli.lock import LOCK_NAME

        same = load_lock(outcome.out_dir / LOCK_NAME).get("output") == lock["output"]
        print(
            f"locked rebuild: output {'is bitwise identical to' if same else 'DIFFERS from'} the locked build's"
        )


def _print_pass(rec: dict) -> None:
    print(
        f"statistics pass {rec['pass']} ({rec['what']}): {rec['seconds']:.1f} s", file=sys.stderr, flush=True
    )


@app.command("emr-materialize")
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
    from merge_cli.emr_materialize import materialize

    final = materialize(out_dir, task, new_out, overwrite)
    print(f"wrote task {task} of {out_dir} to {final}")


@app.command()
@handle_errors
def verify(
    out_dir: Path = typer.Argument(..., help="A folder written by `merge-cli run`."),
    no_finite: bool = typer.Option(
        False, "--no-finite", help="Skip reading every tensor to check for NaN/Inf."
    ),
):
    """Check a merged model: manifest hashes and sizes, index against shards, shapes against config, finiteness."""
    from merge_cli.verify import verify_output

    summary = verify_output(out_dir, check_finite=not no_finite)
    print(f"ok: {out_dir}: {summary}")


@app.command()
@handle_errors
def convert(
    recipe: Path = typer.Argument(..., help="A mergekit recipe YAML file (several documents: multi-stage)."),
):
    """Print the equivalent native merge-cli recipe of a mergekit recipe (checked, but no model is opened)."""
    from merge_cli.mergekit_compat import convert_file

    sys.stdout.write(convert_file(recipe))


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
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Describe a checkpoint from its headers: layers, module groups, dtypes, sizes, tied embeddings."""
    from merge_cli.io.checkpoint import open_checkpoint
    from merge_cli.render import describe_checkpoint, print_checkpoint

    ck = open_checkpoint(model, Path.cwd(), allow_pickle=allow_pickle)
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
    # Idle OpenMP workers sleep instead of spinning (read before torch loads libgomp): a spinning worker
    # takes the core the reader/writer threads need, and a descheduled one stalls every op (tested: a
    # 2-thread linear merge on a busy 2-core machine went from 7 s to 145 s without this).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
