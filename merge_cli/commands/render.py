"""Human-readable output with rich: plan summaries, method docs, checkpoint descriptions, progress."""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from typing import Any

from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from merge_cli.dtypes import ST_TO_NAME
from merge_cli.methods import MethodSpec
from merge_cli.modules import GROUPS, classify
from merge_cli.plan import MergePlan, report_params


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def layer_ranges(layers: list[int]) -> str:
    if not layers:
        return "-"
    xs = sorted(set(layers))
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def param_ranges(param_dicts: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> str:
    """'density=0.2..0.5, lambda=1' over many tensors; values equal to `defaults` everywhere are left out."""
    values: dict[str, list] = defaultdict(list)
    for d in param_dicts:
        for k, v in d.items():
            values[k].extend(v if isinstance(v, list) else [v])
    defaults = defaults or {}
    values = {k: vs for k, vs in values.items() if not (k in defaults and all(x == defaults[k] for x in vs))}
    parts = []
    for k, vs in values.items():
        uniq = list(dict.fromkeys(vs))
        if len(uniq) == 1:
            parts.append(f"{k}={_fmt(uniq[0])}")
        elif all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in uniq):
            parts.append(f"{k}={_fmt(min(uniq))}..{_fmt(max(uniq))}")
        else:
            parts.append(f"{k}={'|'.join(_fmt(x) for x in uniq)}")
    return ", ".join(parts)


def _defaults(method: str) -> dict[str, Any]:
    from merge_cli.methods import METHODS

    params = METHODS[method].params
    return {
        params.key_of(n): f.default
        for n, f in params.model_fields.items()
        if f.default is not PydanticUndefined
    }


def print_plan(p: MergePlan, console: Console) -> None:
    console.print(f"[bold]Plan[/bold] for {p.recipe.path}: method [cyan]{p.recipe.method}[/cyan]")
    models = Table(title="Models", show_edge=False)
    for col in ("#", "label", "path", "tensors", "size"):
        models.add_column(col)
    for i, m in enumerate(p.models):
        tag = " (donor)" if i == p.donor else ""
        models.add_row(
            str(i),
            m.label + tag,
            m.path,
            str(len(m.checkpoint.tensors)),
            human_bytes(m.checkpoint.total_bytes),
        )
    console.print(models)
    rows: dict[tuple, list] = defaultdict(list)
    for job in p.jobs:
        rows[(job.group, job.layer is None, job.method)].append(job)
    table = Table(title="Tensors by module group (parameters that differ from the defaults)", show_edge=False)
    for col in ("group", "layers", "method", "tensors", "parameters", "output"):
        table.add_column(col)
    order = {g: i for i, g in enumerate(GROUPS)}
    for (group, outside, method), jobs in sorted(
        rows.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 9), kv[0][2])
    ):
        layers = "outside layers" if outside else layer_ranges([j.layer for j in jobs])
        table.add_row(
            group, layers, method, str(len(jobs)), param_ranges([report_params(j) for j in jobs], _defaults(method)) or "-",
            human_bytes(sum(j.nbytes for j in jobs)),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"compute {ST_TO_NAME.get(p.compute_dtype)}, output {ST_TO_NAME.get(p.out_dtype)}; {p.num_layers} layers; "
        f"{len(p.jobs)} tensors in {len(p.shards)} shard(s); reads {human_bytes(p.input_bytes)}, "
        f"writes {human_bytes(p.output_bytes)}; estimated peak memory {human_bytes(p.peak_memory_bytes)}"
    )
    for note in p.notes:
        console.print(f"note: {note}")


def print_methods(methods: dict[str, MethodSpec], console: Console) -> None:
    table = Table(show_edge=False)
    for col in ("method", "what it does", "base", "models"):
        table.add_column(col)
    for spec in methods.values():
        n = f"{spec.min_models}+" if spec.max_models is None else (
            str(spec.min_models) if spec.min_models == spec.max_models else f"{spec.min_models}-{spec.max_models}"
        )  # fmt: skip
        table.add_row(
            spec.name,
            spec.title,
            "needed" if spec.needs_base else ("optional" if spec.optional_base else "-"),
            n,
        )
    console.print(table)
    console.print("`merge-cli methods NAME` prints a method's parameters and paper.")


def _constraints(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    ann = field.annotation
    if getattr(ann, "__origin__", None) is not None and str(ann).startswith("typing.Literal"):
        parts.append("one of " + "|".join(map(str, ann.__args__)))
    return ", ".join(parts) or "-"


def print_method(spec: MethodSpec, console: Console) -> None:
    console.print(f"[bold]{spec.name}[/bold]: {escape(spec.title)}", highlight=False)
    console.print(f"paper: {escape(spec.paper)}", highlight=False)
    if spec.summary:
        console.print(f"math: {escape(spec.summary)}", highlight=False)
    needs = (
        "needs base_model"
        if spec.needs_base
        else ("base_model optional (used when given)" if spec.optional_base else "no base model needed")
    )
    most = "any number of" if spec.max_models is None else f"at most {spec.max_models}"
    console.print(
        f"{needs}; at least {spec.min_models}, {most} source model(s)"
        + ("; random (seeded)" if spec.random else "")
    )
    table = Table(show_edge=False)
    for col in ("parameter", "scope", "type", "default", "range", "meaning"):
        table.add_column(col)
    per_model = spec.params.per_model_fields()
    for fname, f in spec.params.model_fields.items():
        ann = f.annotation
        tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = "required" if f.default is PydanticUndefined else _fmt(f.default)
        table.add_row(
            spec.params.key_of(fname), "per model" if fname in per_model else "global", tname, default,
            _constraints(f), escape(f.description or ""),
        )  # fmt: skip
    console.print(table)
    console.print("Any numeric parameter may be a list: a gradient interpolated across layer depth.")


def describe_checkpoint(ck) -> dict[str, Any]:
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    dtypes: Counter = Counter()
    layers = set()
    for name, info in ck.tensors.items():
        c = classify(name)
        g = groups[c.group]
        g["tensors"] += 1
        g["params"] += math.prod(info.shape)
        g["bytes"] += info.nbytes
        dtypes[info.dtype] += info.nbytes
        if c.layer is not None:
            layers.add(c.layer)
    cfg = ck.config or {}
    has_head = any(classify(n).group == "lm_head" for n in ck.tensors)
    tied = cfg.get("tie_word_embeddings")
    return {
        "path": str(ck.path),
        "architecture": (cfg.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "layers": ck.num_layers() if ck.num_layers() is not None else (max(layers) + 1 if layers else 0),
        "tensors": len(ck.tensors),
        "parameters": sum(g["params"] for g in groups.values()),
        "bytes": ck.total_bytes,
        "files": [str(p.name) for p in ck.files],
        "dtypes": {ST_TO_NAME.get(k, k): v for k, v in dtypes.most_common()},
        "groups": dict(groups),
        "tied_embeddings": bool(tied) if tied is not None else not has_head,
        "has_lm_head": has_head,
    }


def print_checkpoint(info: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{info['path']}[/bold]")
    console.print(
        f"architecture {info['architecture'] or 'unknown'} ({info['model_type'] or '-'}); {info['layers']} layers; "
        f"{info['tensors']} tensors, {info['parameters']:,} parameters, {human_bytes(info['bytes'])} in "
        f"{len(info['files'])} file(s)"
    )
    console.print("dtypes: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["dtypes"].items()))
    console.print(
        f"tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}"
        + ("" if info["has_lm_head"] else " (no lm_head tensor)")
    )
    table = Table(show_edge=False)
    for col in ("group", "tensors", "parameters", "size"):
        table.add_column(col)
    for g in GROUPS:
        if g in info["groups"]:
            d = info["groups"][g]
            table.add_row(g, str(d["tensors"]), f"{d['params']:,}", human_bytes(d["bytes"]))
    console.print(table)


@contextlib.contextmanager
def progress_bar(plan: MergePlan, disable: bool = False):
    """Yields advance(job, nbytes): tensors done, input bytes/s, ETA."""
    if disable:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]merging[/bold] {task.fields[done]}/{task.fields[count]} tensors"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with progress:
        task = progress.add_task("merge", total=plan.input_bytes or 1, done=0, count=len(plan.jobs))
        state = {"done": 0}

        def advance(job, nbytes: int) -> None:
            state["done"] += 1
            progress.update(task, advance=nbytes, done=state["done"])

        yield advance
