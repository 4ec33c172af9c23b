"""`merge-cli report`: (re)draw a merge's HTML report from its merge_report.json, or compare two merges."""

from __future__ import annotations

import json
import webbrowser
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import handle_errors, out
from merge_cli.errors import MergeCliError

REPORT_JSON = "merge_report.json"
REPORT_HTML = "merge_report.html"


def load_output(out_dir: Path) -> tuple[dict, str, dict | None]:
    """(merge_report.json, recipe.yaml text, lock or None) of a merge output folder; one-line errors."""
    out_dir = Path(out_dir)
    path = out_dir / REPORT_JSON
    if not out_dir.is_dir():
        raise MergeCliError(f"{out_dir}: no such folder; give a merge output folder (from `merge-cli run`)")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeCliError(
            f"{path}: not found; is {out_dir} the output folder of `merge-cli run`?"
        ) from None
    except (OSError, ValueError) as e:
        raise MergeCliError(f"{path}: cannot read it as JSON ({e}); rerun the merge to rewrite it") from None
    if not isinstance(report, dict) or report.get("tool") != "merge-cli" or "tensors" not in report:
        raise MergeCliError(f"{path}: not a merge-cli merge report (no tool/tensors keys)")
    try:
        recipe_text = (out_dir / "recipe.yaml").read_text()
    except OSError:
        recipe_text = ""
    from merge_cli.io.lock import LOCK_NAME, LockError, load_lock

    lock = None
    if (out_dir / LOCK_NAME).exists():
        try:
            lock = load_lock(out_dir / LOCK_NAME)
        except LockError:
            lock = None  # the page says revisions and hashes are not shown
    return report, recipe_text, lock


@handle_errors
def report(
    out_dir: Optional[Path] = typer.Argument(
        None, help="A merge output folder: its merge_report.html is redrawn from merge_report.json."
    ),
    compare: Optional[tuple[str, str]] = typer.Option(
        None,
        "--compare",
        metavar="OUT_A OUT_B",
        help="Two merge output folders to put side by side (e.g. a ties and a dare_ties merge of the same inputs).",
    ),
    output: Optional[Path] = typer.Option(
        None,
        "--output",
        "-o",
        help="Where to write the page (default: OUT_DIR/merge_report.html; with --compare, merge_compare.html).",
    ),
    open_: bool = typer.Option(False, "--open", help="Open the page in the web browser when written."),
):
    """Write the HTML merge report from merge_report.json (no model is read), or compare two merges.

    `merge-cli run` writes merge_report.html itself; this command redraws it (e.g. after installing
    matplotlib for the plots) or builds a comparison page of two merges.

    Examples:

    \b
    merge-cli report out/ties --open
    merge-cli report --compare out/ties out/dare_ties -o ties_vs_dare.html
    """
    from merge_cli.output.html_report import compare_html, merge_report_html, write_html

    pair = (Path(compare[0]), Path(compare[1])) if compare and all(compare) else None
    if pair is None and out_dir is None:
        raise MergeCliError("give a merge output folder (merge-cli report OUT_DIR) or --compare OUT_A OUT_B")
    if pair is not None and out_dir is not None:
        raise MergeCliError("give either OUT_DIR or --compare OUT_A OUT_B, not both")
    if pair is not None:
        a, b = (load_output(p)[0] for p in pair)
        names = (Path(pair[0]).name or str(pair[0]), Path(pair[1]).name or str(pair[1]))
        if names[0] == names[1]:
            names = (str(pair[0]), str(pair[1]))
        path = write_html(output or Path("merge_compare.html"), compare_html(a, b, names))
    else:
        rep, recipe_text, lock = load_output(out_dir)
        path = write_html(output or Path(out_dir) / REPORT_HTML, merge_report_html(rep, recipe_text, lock))
    out.print(f"wrote {path}")
    if open_:
        webbrowser.open(path.resolve().as_uri())
