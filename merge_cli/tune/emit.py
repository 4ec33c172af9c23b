"""Learned coefficients -> an ordinary recipe that `merge-cli run` turns into the tuned model, no data needed.

task granularity:  models[].parameters.weight
layer granularity: one override per decoder layer (`match: "*"`, `layers: [l, l+1]`) and one per outer
                   module group (embed, norm, lm_head), each with model_parameters.<model>.weight
block granularity: one override per tensor (its exact name)
The candidate is re-planned before it is written: every tensor must get the learned weights and keep its
method and every other parameter. When the compact form cannot guarantee that (the starting recipe's own
overrides set weights, methods or other parameters that a new override would shadow), the recipe spells
each tuned tensor's full parameters out in overrides (tensors with equal parameters share one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import yaml

from merge_cli.errors import MergeCliError
from merge_cli.methods import METHODS
from merge_cli.modules import GROUPS
from merge_cli.plan import MergePlan, TensorJob, build_plan, report_params
from merge_cli.recipe import Recipe, load_recipe
from merge_cli.tune.merged import MergedModel


def _relocate(ref: str, recipe: Recipe, out_dir: Path) -> str:
    """A local model path as seen from the new recipe's folder; hub ids and LoRA refs as they were."""
    p = Path(os.path.expanduser(ref))
    if p.is_absolute():
        return ref
    for c in ([recipe.base_dir / p] if recipe.base_dir else []) + [p]:
        if c.exists():
            return os.path.relpath(c.resolve(), out_dir.resolve())
    return ref


def _fnum(x) -> float:
    return float(x)


def _exact(name: str) -> str:
    return (
        name
        if not any(ch in name for ch in "*?[]") and not name.startswith("re:")
        else f"re:^{re.escape(name)}$"
    )


def _base_data(recipe: Recipe, out_dir: Path) -> dict:
    data = recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if data.get("base_model"):
        data["base_model"] = _relocate(data["base_model"], recipe, out_dir)
    data["models"] = [
        {"model": _relocate(m.model, recipe, out_dir), "name": m.label,
         **({"parameters": dict(m.parameters)} if m.parameters else {})}
        for m in recipe.models
    ]  # fmt: skip
    return data


def _weights_by_label(merged: MergedModel, row: torch.Tensor) -> dict[str, dict[str, float]]:
    return {label: {"weight": _fnum(row[k])} for k, label in enumerate(merged.models)}


def compact(recipe: Recipe, merged: MergedModel, coeffs: torch.Tensor, out_dir: Path) -> dict:
    data = _base_data(recipe, out_dir)
    if merged.granularity == "task":
        by_label = _weights_by_label(merged, coeffs[0])
        for m in data["models"]:
            if m["name"] in by_label:
                m.setdefault("parameters", {})["weight"] = by_label[m["name"]]["weight"]
        return data
    new = []
    for g, key in enumerate(merged.groups):
        mp = _weights_by_label(merged, coeffs[g])
        if merged.granularity == "block":
            new.append({"match": _exact(key), "model_parameters": mp})
        elif key.startswith("layer "):
            n = int(key.split()[1])
            new.append({"match": "*", "layers": [n, n + 1], "model_parameters": mp})
        else:
            assert key in GROUPS
            new.append({"match": key, "model_parameters": mp})
    data["overrides"] = new + data.get("overrides", [])
    return data


def spelled_out(
    recipe: Recipe, plan: MergePlan, merged: MergedModel, coeffs: torch.Tensor, out_dir: Path
) -> dict:
    data = _base_data(recipe, out_dir)
    rows: dict[str, dict] = {}
    for t in merged.tuned:
        job = next(j for j in plan.jobs if j.name == t.name)
        spec = METHODS[job.method]
        per_model = {spec.params.key_of(f) for f in spec.params.per_model_fields()}
        params = report_params(job)
        labels = [plan.models[i.model].label for i in job.inputs]
        mp = {
            label: {
                k: (coeffs[t.group][i].item() if k == "weight" else v[i])
                for k, v in params.items()
                if k in per_model
            }
            for i, label in enumerate(labels)
        }
        for label in labels:
            mp[label]["weight"] = _fnum(mp[label]["weight"])
        glob = {k: v for k, v in params.items() if k not in per_model}
        body = {"method": job.method, "parameters": glob, "model_parameters": mp}
        rows.setdefault(json.dumps(body, sort_keys=True), {"match": [], **body})["match"].append(
            _exact(t.name)
        )
    data["overrides"] = list(rows.values()) + data.get("overrides", [])
    return data


def _signature(job: TensorJob) -> tuple:
    p = {k: v for k, v in job.params.items() if k != "weight"}
    return job.method, json.dumps(p, sort_keys=True, default=str), [i.name for i in job.inputs]


def _mismatch(old: MergePlan, new: MergePlan, want: dict[str, list[float]]) -> str | None:
    if [j.name for j in old.jobs] != [j.name for j in new.jobs]:
        return "the tensor list changed"
    for a, b in zip(old.jobs, new.jobs):
        if _signature(a) != _signature(b):
            return f"tensor '{a.name}' changed method or parameters"
        w = want.get(a.name, [float(x) for x in a.weights])
        if [float(x) for x in b.weights] != w:
            return f"tensor '{a.name}' gets weights {b.weights}, not {w}"
    return None


def write_recipe(
    recipe: Recipe, plan: MergePlan, merged: MergedModel, coeffs: torch.Tensor, out: Path, header: list[str]
) -> str:
    """Write the tuned recipe to `out` (atomically) after checking its plan; returns 'compact' or 'spelled out'."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    want = {t.name: [_fnum(x) for x in coeffs[t.group]] for t in merged.tuned}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        for form, make in (("compact", compact), ("spelled out", None)):
            data = (
                make(recipe, merged, coeffs, out.parent)
                if make
                else spelled_out(recipe, plan, merged, coeffs, out.parent)
            )
            text = "".join(f"# {h}\n" for h in header) + yaml.safe_dump(data, sort_keys=False)
            tmp.write_text(text)
            try:
                check = build_plan(load_recipe(tmp))
            except MergeCliError as e:
                problem = str(e)
            else:
                problem = _mismatch(plan, check, want)
                check.close()
            if problem is None:
                os.replace(tmp, out)
                return form
        raise MergeCliError(
            f"{out}: the tuned recipe would not rebuild the tuned model ({problem}); please report this"
        )
    finally:
        if tmp.exists():
            tmp.unlink()
