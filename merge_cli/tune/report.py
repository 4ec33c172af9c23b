"""What a tune shows: the memory bound, a progress bar with the loss, the table of learned coefficients."""

from __future__ import annotations

import contextlib

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.plan import MergePlan
from merge_cli.render import human_bytes
from merge_cli.tune.merged import TUNABLE

FP32 = 4


def memory_bound(plan: MergePlan, tasks: dict, batch: int) -> tuple[int, str]:
    """Bytes a tune holds: the base model, K task vectors and one merged copy of each tuned tensor (compute
    dtype), plus a rough activation estimate for one batch per task (fp32, kept for the backward pass)."""
    item = ST_TO_TORCH[plan.compute_dtype].itemsize
    tuned = [j for j in plan.jobs if j.method in TUNABLE and j.base is not None]
    k = max((len(j.inputs) for j in tuned), default=0)
    tuned_n = sum(j.numel for j in tuned)
    all_n = sum(j.numel for j in plan.jobs)
    cfg = plan.config or {}
    hidden, layers = int(cfg.get("hidden_size", 0)), int(cfg.get("num_hidden_layers", 0))
    inter, vocab = int(cfg.get("intermediate_size", 4 * hidden)), int(cfg.get("vocab_size", 0))
    tokens = sum(min(batch, len(v)) * max(len(e.ids) for e in v) for v in tasks.values())
    # per token and layer: residual, norms, q/k/v/o, attention output, MLP in/gate/up/act (~12 h + 3 i)
    act = tokens * (layers * (12 * hidden + 3 * inter) + 3 * vocab) * FP32
    base, vectors, copy = all_n * item, k * tuned_n * item, tuned_n * item
    parts = (
        f"base {human_bytes(base)} + {k} task vectors {human_bytes(vectors)} + merged copy {human_bytes(copy)}"
        f" + activations ~{human_bytes(act)}"
    )
    return base + vectors + copy + act, parts


@contextlib.contextmanager
def progress(steps: int, quiet: bool):
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


def print_table(merged, coeffs: torch.Tensor, limit: int = 60) -> None:
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
