"""Per-layer figures of a merge, from merge_report.json's per-tensor statistics (no model is read).

The engine reports, per tensor, the task-vector norm of each input (`task_vector_norms`), and for the
methods that trim or elect signs the `kept_fraction` per input and the `sign_conflict_rate`. Here they are
grouped by layer and module group (merge_cli.modules): norms as the root of summed squares (the norm of
the layer's concatenated task vector), kept fractions and conflict rates as means over the tensors that
report them (as the report's summary does).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from merge_cli.modules import classify


def expert_labels(report: dict[str, Any]) -> list[str]:
    """The labels of the task vectors' models: the report's `experts`, else inferred from the count."""
    if report.get("experts"):
        return list(report["experts"])
    counts = Counter(
        len(t["task_vector_norms"]) for t in report.get("tensors", []) if t.get("task_vector_norms")
    )
    if not counts:
        return []
    n = counts.most_common(1)[0][0]
    models = [m["label"] for m in report.get("models", [])]
    return models[-n:] if len(models) == n + 1 else [f"input {k + 1}" for k in range(n)]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def layer_table(report: dict[str, Any]) -> dict[str, Any]:
    """{layers, experts, groups, norm: {expert: [per layer]}, kept: {expert: [...]}, conflict: [...],
    conflict_cells: {group: [per layer]}}; norm/kept/conflict are empty when no tensor reported them."""
    experts = expert_labels(report)
    n = len(experts)
    sq: dict[int, list[float]] = {}
    kept: dict[int, list[list[float]]] = {}
    conf: dict[int, list[float]] = {}
    cells: dict[tuple[int, str], list[float]] = {}
    seen: set[int] = set()
    for t in report.get("tensors", []):
        layer, group = classify(t["name"])
        if layer is None:
            continue
        norms, kf = t.get("task_vector_norms"), t.get("kept_fraction")
        if norms and len(norms) == n:
            seen.add(layer)
            acc = sq.setdefault(layer, [0.0] * n)
            for i, v in enumerate(norms):
                acc[i] += v * v
        if kf and len(kf) == n:
            seen.add(layer)
            ks = kept.setdefault(layer, [[] for _ in range(n)])
            for i, v in enumerate(kf):
                ks[i].append(v)
        if "sign_conflict_rate" in t:
            seen.add(layer)
            conf.setdefault(layer, []).append(t["sign_conflict_rate"])
            cells.setdefault((layer, group), []).append(t["sign_conflict_rate"])
    layers = sorted(seen)
    groups = sorted({g for _, g in cells})
    return {
        "layers": layers,
        "experts": experts,
        "groups": groups,
        "norm": {e: [math.sqrt(sq[k][i]) if k in sq else None for k in layers] for i, e in enumerate(experts)}
        if sq
        else {},
        "kept": {e: [_mean(kept[k][i]) if k in kept else None for k in layers] for i, e in enumerate(experts)}
        if kept
        else {},
        "conflict": [_mean(conf.get(k, [])) for k in layers] if conf else [],
        "conflict_cells": {g: [_mean(cells.get((k, g), [])) for k in layers] for g in groups},
    }


def plan_experts(plan) -> list[str]:
    """The labels of the models whose task vectors the engine reports (the inputs of the first job that
    has a base), for merge_report.json's `experts`."""
    for job in plan.jobs:
        if job.base is not None:
            return [plan.models[r.model].label for r in job.inputs]
    return []


def run_findings(report: dict[str, Any], lt: dict[str, Any]) -> list[str]:
    """The analysis rules that the engine's figures support (per-layer norm imbalance), for the HTML report."""
    from merge_cli.analysis.findings import imbalance

    experts = lt["experts"]
    if len(experts) < 2 or not lt["norm"]:
        return []
    weights: dict[str, list[float]] = {e: [] for e in experts}
    for t in report.get("tensors", []):
        w = (t.get("params") or {}).get("weight")
        if isinstance(w, list) and len(w) == len(experts):
            for e, v in zip(experts, w):
                weights[e].append(float(v))
    rows = [
        {"layer": k, "experts": {e: {"norm": lt["norm"][e][i]} for e in experts}}
        for i, k in enumerate(lt["layers"])
        if all(lt["norm"][e][i] is not None for e in experts)
    ]
    res = {"experts": experts, "by_layer": rows, "weights": {e: _mean(w) for e, w in weights.items()}}
    return imbalance(res)
