"""`merge-cli analyze`: look at a recipe's task vectors before merging (no output model)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import ALLOW_PICKLE_HELP, handle_errors, load_recipe_arg, out, size_arg


@handle_errors
def analyze(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (the same one `merge-cli run` takes)."),
    html: Optional[Path] = typer.Option(
        None,
        "--html",
        help="Also write a self-contained HTML page with the plots and tables (e.g. analysis.html).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the full analysis as JSON on stdout instead of the tables."
    ),
    device: str = typer.Option("cpu", help="Compute device: cpu, auto (CUDA when present), cuda or cuda:N."),
    max_memory: Optional[str] = typer.Option(
        None,
        help="Memory budget, e.g. 2GB: bigger tensors are read in pieces (default: 1/8 of free RAM, 1-16 GB).",
    ),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (overrides the recipe)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    allow_arch_mismatch: bool = typer.Option(False, help="Analyze models whose config architectures differ."),
    allow_pickle: bool = typer.Option(False, help=ALLOW_PICKLE_HELP),
):
    """Measure the recipe's task vectors (expert - base) before merging, and what its method does to them.

    Streams every input once, one tensor at a time, and writes no model. Per expert, per layer and per module
    group: task-vector norm and |tau|/|base|, pairwise cosine and sign-conflict rate, the share of mass in the
    top 1/5/20% of magnitudes, and for the recipe's method the kept fraction and elected-sign agreement.
    Ends with plain-language findings (e.g. an expert that dominates some layers, and the weight to try).

    Example: merge-cli analyze recipes/ties.yaml --html analysis.html
    """
    from merge_cli.analysis.analyze import analyze as run_analysis
    from merge_cli.engine import default_max_memory, resolve_device
    from merge_cli.output.html_report import analysis_html, write_html
    from merge_cli.plan import build_plan

    rec = load_recipe_arg(recipe, seed)
    budget = size_arg(max_memory, "--max-memory") or default_max_memory()
    dev = resolve_device(device)
    plan = build_plan(rec, allow_arch_mismatch=allow_arch_mismatch, allow_pickle=allow_pickle)
    try:
        with _progress(plan, disable=quiet or as_json) as advance:
            res = run_analysis(plan, budget, dev, advance, recipe_text=_text(recipe))
    finally:
        plan.close()
    if html is not None:
        write_html(html, analysis_html(res))
    if as_json:
        print(json.dumps(res, indent=1))
        return
    _print(res)
    if html is not None:
        out.print(f"HTML: {html}")


def _text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@contextmanager
def _progress(plan, disable: bool = False):
    """advance(job, nbytes): a rich bar over the input bytes (tensors done, speed, ETA)."""
    if disable:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("[bold]analyzing[/bold] {task.fields[done]}/{task.fields[count]} tensors"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task("analyze", total=plan.input_bytes or 1, done=0, count=len(plan.jobs))
        done = [0]

        def advance(job, nbytes: int) -> None:
            done[0] += 1
            progress.update(task, advance=nbytes, done=done[0])

        yield advance


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4g}"


def _print(res: dict) -> None:
    from rich.table import Table

    out.print(
        f"analysis of {res['recipe']} ({res['method']}): {res['tensors_measured']}/{res['tensors']} tensors, "
        f"{res['bytes_read'] / 1e6:.1f} MB read in {res['seconds']:.1f} s; base: {res['base']}"
    )
    if not res["experts"]:
        for n in res["notes"]:
            out.print(f"note: {n}")
        return
    t = Table(title="task vectors (whole model)", show_edge=False)
    for col in ("expert", "|tau|", "|tau|/|base|", "top 1%", "top 5%", "top 20%", "kept", "sign agreement"):
        t.add_column(col)
    for e, r in res["overall"]["experts"].items():
        m = r["top_mass"]
        t.add_row(
            e, _fmt(r["norm"]), _fmt(r["rel_norm"]), _fmt(m["1%"], True), _fmt(m["5%"], True),
            _fmt(m["20%"], True), _fmt(r.get("kept_fraction"), True), _fmt(r.get("sign_agreement"), True),
        )  # fmt: skip
    out.print(t)
    if res["overall"]["pairs"]:
        p = Table(title="pairs: cosine / sign conflict, whole model and per module group", show_edge=False)
        groups = list(res["by_group"])
        for col in ("pair", "all", *groups):
            p.add_column(col)
        for k, pair in enumerate(res["overall"]["pairs"]):
            cells = [res["overall"]["pairs"][k]] + [res["by_group"][g]["pairs"][k] for g in groups]
            p.add_row(
                f"{pair['a']} / {pair['b']}",
                *(f"{_fmt(c['cosine'])} / {_fmt(c['sign_conflict'], True)}" for c in cells),
            )
        out.print(p)
    for n in res["notes"]:
        out.print(f"note: {n}")
    out.print("[bold]findings[/bold]")
    for f in res["findings"]:
        out.print(f"- {f}")
