"""merge_report.json / merge_report.md and the README.md model card, built from the plan and engine stats."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from merge_cli import __version__
from merge_cli.dtypes import ST_TO_NAME
from merge_cli.methods import METHODS
from merge_cli.plan import MergePlan


def build_report(plan: MergePlan, tensors: list[dict[str, Any]], engine: dict[str, Any]) -> dict[str, Any]:
    methods = sorted({t["method"] for t in tensors})
    return {
        "tool": "merge-cli",
        "version": __version__,
        "recipe": str(plan.recipe.path) if plan.recipe.path else None,
        "method": plan.recipe.method,
        "methods_used": {m: {"title": METHODS[m].title, "paper": METHODS[m].paper} for m in methods},
        "models": [{"label": m.label, "ref": m.ref, "path": m.path} for m in plan.models],
        "donor": plan.models[plan.donor].label,
        "seed": plan.recipe.seed,
        "compute_dtype": ST_TO_NAME.get(plan.compute_dtype, plan.compute_dtype),
        "out_dtype": ST_TO_NAME.get(plan.out_dtype, plan.out_dtype),
        "num_layers": plan.num_layers,
        "shards": [s.filename for s in plan.shards],
        "notes": plan.notes,
        "engine": engine,
        "summary": summarize(tensors),
        "tensors": tensors,
    }


def summarize(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures: per method, tensor count, mean kept fraction and sign-conflict rate where reported."""
    by: dict[str, list[dict]] = defaultdict(list)
    for t in tensors:
        by[t["method"]].append(t)
    out = {}
    for m, ts in sorted(by.items()):
        row: dict[str, Any] = {"tensors": len(ts)}
        kept = [sum(t["kept_fraction"]) / len(t["kept_fraction"]) for t in ts if t.get("kept_fraction")]
        conf = [t["sign_conflict_rate"] for t in ts if "sign_conflict_rate" in t]
        if kept:
            row["mean_kept_fraction"] = round(statistics.fmean(kept), 6)
        if conf:
            row["mean_sign_conflict_rate"] = round(statistics.fmean(conf), 6)
        out[m] = row
    return out


def _kernels(line: str) -> str:
    """engine.kernels as a phrase: 'native kernels', 'plain kernels: multislerp has no fast path'."""
    return line if line.startswith("plain kernels") else f"{line} kernels"


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Merge report ({report['tool']} {report['version']})",
        "",
        f"- method: `{report['method']}`; compute {report['compute_dtype']}, output {report['out_dtype']}; seed {report['seed']}",
        f"- models: {', '.join(m['label'] for m in report['models'])} (config and tokenizer from `{report['donor']}`)",
        f"- engine: {report['engine'].get('seconds', 0):.2f} s on {report['engine'].get('device')} "
        f"({_kernels(report['engine'].get('kernels', 'plain'))}), "
        f"{report['engine'].get('bytes_read', 0) / 1e6:.1f} MB read, {report['engine'].get('bytes_written', 0) / 1e6:.1f} MB written",
        "",
        "| method | tensors | mean kept fraction | mean sign-conflict rate |",
        "|---|---|---|---|",
    ]
    for m, row in report["summary"].items():
        lines.append(
            f"| {m} | {row['tensors']} | {row.get('mean_kept_fraction', '-')} | {row.get('mean_sign_conflict_rate', '-')} |"
        )
    for note in report["notes"]:
        lines.append(f"\n> {note}")
    lines.append(
        "\nPer-tensor figures (task-vector norms, kept fractions, sign conflicts) are in merge_report.json."
    )
    return "\n".join(lines) + "\n"
