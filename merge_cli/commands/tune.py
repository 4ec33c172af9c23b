"""`merge-cli tune`: learn merge coefficients from a little data and write them as a plain recipe."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from merge_cli.commands.common import handle_errors, load_recipe_arg, out, size_arg
from merge_cli.errors import MergeCliError

PRESETS = {  # objective, granularity, clamp
    "adamerging": ("entropy", "layer", (0.0, 1.0)),
    "atlas": ("nll", "block", None),
    "self-positioning": ("nll", "task", None),
}
MEMORY_HELP = (
    "Memory budget, e.g. 24GB: refuse (one line) when the tune cannot fit. The tune holds the base model plus, "
    "for every tuned tensor, K task vectors, one merged copy and its gradient, all in the recipe's compute "
    "dtype: about (K + 3) x the model's size, plus activations of one batch per task."
)


def _clamp(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise MergeCliError(f"--clamp {text}: give LOW,HIGH (e.g. 0,1) or none") from None
    if lo > hi:
        raise MergeCliError(f"--clamp {text}: LOW must not exceed HIGH")
    return lo, hi


def _memory_line(m: dict[str, int]) -> tuple[str, str]:
    from merge_cli.commands.render import human_bytes as h

    parts = (
        f"base {h(m['base'])} + {m['K']} task vectors {h(m['task vectors'])} + merged copy "
        f"{h(m['merged copy'])} + its gradient {h(m['its gradient'])} + activations ~{h(m['activations'])}"
    )
    return h(m["total"]), parts


@contextlib.contextmanager
def _progress(steps: int, quiet: bool):
    """Yields on_step(step, loss) that advances a rich bar showing the loss."""
    if quiet or steps == 0:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]tuning[/bold]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True),
    )  # fmt: skip
    with bar:
        task = bar.add_task("tune", total=steps, loss="-")

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step, loss=f"{loss:.4f}")

        yield on_step


def _print_table(merged, coeffs, limit: int = 60) -> None:
    table = Table(title="learned coefficients (weight per model)")
    table.add_column("group")
    for label in merged.models:
        table.add_column(label, justify="right")
    for g, key in enumerate(merged.groups[:limit]):
        start = merged.start[g]
        table.add_row(key, *(f"{float(c):.4f} ({float(s):.2f})" for c, s in zip(coeffs[g], start)))
    if len(merged.groups) > limit:
        table.add_row(f"... {len(merged.groups) - limit} more", *([""] * len(merged.models)))
    Console().print(table)


@handle_errors
def tune(
    recipe: Path = typer.Argument(..., help="Starting recipe (method task_arithmetic or ties)."),
    out_recipe: Path = typer.Argument(..., help="Where to write the tuned recipe (YAML)."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="JSONL tuning data: entropy: text (or input_ids) [+ task]; nll: prompt + completion "
        "(or prompt_ids + completion_ids) [+ task].",
    ),
    merge: Optional[Path] = typer.Option(None, "--merge", help="Also run the tuned recipe into this folder."),
    preset: Optional[str] = typer.Option(
        None,
        help="adamerging (entropy, layer, clamp 0,1), atlas (nll, block, unconstrained) or "
        "self-positioning (nll, task, unconstrained); explicit options win.",
    ),
    objective: Optional[str] = typer.Option(
        None,
        help="entropy: mean next-token entropy on unlabeled text (AdaMerging); nll: loss on completions.",
    ),
    granularity: Optional[str] = typer.Option(
        None,
        help="task: one weight per model; layer: per model per decoder layer (+ embed, norm, head); "
        "block: per model per tensor (aTLAS). Default layer.",
    ),
    steps: int = typer.Option(100, min=0, help="Optimizer steps (0: write the starting coefficients)."),
    lr: float = typer.Option(1e-3, help="Adam learning rate for the coefficients."),
    batch: int = typer.Option(8, min=1, help="Examples per task per step."),
    clamp: Optional[str] = typer.Option(
        None,
        help="Keep coefficients in LOW,HIGH after each step (default 0,1; presets atlas/self-positioning: none).",
    ),
    entropy_on: str = typer.Option(
        "all", help="entropy objective: score all tokens of each text, or the last one."
    ),
    max_length: int = typer.Option(512, min=2, help="Truncate each example to this many tokens."),
    seed: int = typer.Option(0, help="Seed of the batch sampler (fixed seed, same coefficients)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    max_memory: Optional[str] = typer.Option(None, help=MEMORY_HELP),
    resume: bool = typer.Option(
        False, help="Continue from OUT_RECIPE.tune-state.pt (saved every 10 steps) up to --steps."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
):
    """Learn per-model merge weights (per task, layer or tensor block) by gradient descent through the merged
    model, and write them as an ordinary recipe that `merge-cli run` rebuilds without data.

    Memory: base + K task vectors + a merged copy of the tuned tensors and its gradient, on the device:
    about (K + 3) x the model, plus activations (see --max-memory).

    Example: merge-cli tune recipes/tune_adamerging.yaml tuned.yaml --data recipes/tune_data.jsonl --steps 50
    """
    from merge_cli.plan import build_plan
    from merge_cli.recipe.stages import is_multi_stage
    from merge_cli.tune.loop import TuneOptions
    from merge_cli.tune.merged import GRANULARITIES, TUNABLE
    from merge_cli.tune.objective import OBJECTIVES, require_transformers

    p_obj, p_gran, p_clamp = PRESETS.get(preset or "adamerging", (None, None, None))
    if preset and preset not in PRESETS:
        raise MergeCliError(f"--preset {preset}: use one of {', '.join(PRESETS)}")
    objective = objective or p_obj
    granularity = granularity or p_gran
    clamp_range = _clamp(clamp) if clamp is not None else p_clamp
    if objective not in OBJECTIVES:
        raise MergeCliError(f"--objective {objective}: use entropy or nll")
    if granularity not in GRANULARITIES:
        raise MergeCliError(f"--granularity {granularity}: use task, layer or block")
    if entropy_on not in ("all", "last"):
        raise MergeCliError(f"--entropy-on {entropy_on}: use all or last")
    require_transformers()
    if is_multi_stage(recipe):
        raise MergeCliError(f"{recipe}: tune takes a one-stage recipe")
    r = load_recipe_arg(recipe)
    if r.slices or r.method not in TUNABLE:
        raise MergeCliError(
            f"{recipe}: tune starts from a `models:` recipe whose method is task_arithmetic or ties (this one: {r.method})"
        )
    plan = build_plan(r)
    opts = TuneOptions(objective, granularity, steps, lr, batch, clamp_range, seed, entropy_on == "last")
    try:
        _tune(plan, r, recipe, out_recipe, data, merge, opts, max_length, device, max_memory, resume, quiet)
    finally:
        plan.close()


def _tune(plan, r, recipe, out_recipe, data, merge, opts, max_length, device, max_memory, resume, quiet):
    from merge_cli.engine import resolve_device
    from merge_cli.tune.data import Tokenizer, by_task, load_data
    from merge_cli.tune.emit import write_recipe
    from merge_cli.tune.loop import Tuner
    from merge_cli.tune.memory import memory_bound
    from merge_cli.tune.merged import MergedModel
    from merge_cli.tune.objective import build_model

    o = opts
    objective, granularity, steps, batch, clamp_range, lr, seed = (
        o.objective, o.granularity, o.steps, o.batch, o.clamp, o.lr, o.seed
    )  # fmt: skip
    dev = resolve_device(device)
    if merge is not None:  # before the tune, not after it
        from merge_cli.io.writer import check_output

        check_output(merge, [Path(m.path) for m in plan.models], overwrite=False)
    base_slot = next(j.base.model for j in plan.jobs if j.base is not None)
    base_path = Path(plan.models[base_slot].path)
    folder = base_path if base_path.is_dir() else base_path.parent
    embed = next((j for j in plan.jobs if j.group == "embed"), None)
    vocab = int(embed.shape[0]) if embed else int((plan.config or {}).get("vocab_size", 0))
    examples = load_data(data, objective, vocab, Tokenizer(folder), plan.models[base_slot].label, max_length)
    tasks = by_task(examples)
    mem = memory_bound(plan, tasks, batch)
    bound, parts = _memory_line(mem)
    if max_memory is not None and mem["total"] > size_arg(max_memory, "--max-memory"):
        raise MergeCliError(
            f"--max-memory {max_memory} cannot hold the tune: it needs about {bound} ({parts}); "
            "raise --max-memory, tune fewer models, or use a smaller --batch/--max-length"
        )
    if not quiet:
        out.print(
            f"tune: {objective} on {len(examples)} example(s) in {len(tasks)} task(s), granularity {granularity}, "
            f"{steps} step(s), lr {lr}, batch {batch}/task, clamp {list(clamp_range) if clamp_range else 'none'}, "
            f"device {dev}; memory bound about {bound} ({parts})"
        )
    merged = MergedModel(plan, granularity, dev)
    model = build_model(folder, {**merged.base, **merged.fixed}, dev, merged.dtype)
    tuner = Tuner(merged, model, tasks, opts)
    out_recipe.parent.mkdir(parents=True, exist_ok=True)
    state = out_recipe.with_name(out_recipe.name + ".tune-state.pt")
    if resume and not state.exists():
        raise MergeCliError(f"--resume: no saved state {state}; run without --resume first")
    before = tuner.evaluate(merged.start)
    t0 = time.perf_counter()
    with _progress(steps, quiet) as on_step:
        coeffs, history = tuner.run(merged.start, state, resume, on_step)
    seconds = time.perf_counter() - t0
    after = tuner.evaluate(coeffs)
    digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()[:12]
    header = [
        f"tuned by merge-cli tune from {recipe.name}: objective {objective}, granularity {granularity}, "
        f"{steps} steps, lr {lr}, batch {batch}, clamp {list(clamp_range) if clamp_range else 'none'}, seed {seed}",
        f"data {Path(data).name} (sha256 {digest}...); {objective} {before:.4f} -> {after:.4f}",
    ]
    form = write_recipe(r, plan, merged, coeffs, out_recipe, header)
    from merge_cli.output.html_report import tune_html, write_html

    page = write_html(
        out_recipe.with_suffix(".html"),
        tune_html(
            f"merge-cli tune: {out_recipe.name}",
            header,
            merged.groups,
            merged.models,
            merged.start,
            coeffs,
            history,
        ),
    )
    if not quiet:
        _print_table(merged, coeffs)
        print(f"plots of the coefficients and the loss: {page}")
    print(f"{objective}: {before:.4f} -> {after:.4f} in {steps} step(s), {seconds:.1f} s; wrote {out_recipe} ({form}, {len(merged.groups)} group(s) x "
          f"{len(merged.models)} model(s))")  # fmt: skip
    if merge is not None:
        from merge_cli.merge import execute
        from merge_cli.plan import build_plan
        from merge_cli.recipe import load_recipe

        p2 = build_plan(load_recipe(out_recipe))
        try:
            done = execute(p2, merge)
        finally:
            p2.close()
        print(f"merged the tuned recipe into {done.out_dir}")
