"""What every command shares: one-line errors with exit 2, Ctrl-C as exit 130, the console, option helpers."""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from merge_cli.errors import MergeCliError

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


def load_recipe_arg(recipe: Path, seed: Optional[int] = None):
    """The recipe a command was given, with the --seed override applied."""
    from merge_cli.recipe import load_recipe

    return load_recipe(recipe, {"seed": seed} if seed is not None else None)


def size_arg(value: Optional[str], option: str = "--shard-size") -> Optional[int]:
    """A size option ('5GB', '500MB') in bytes, or None when not given."""
    if value is None:
        return None
    from merge_cli.recipe import parse_size

    return parse_size(value, option)
