"""Running a multi-stage recipe: each named stage merged into the intermediate folder (or reused when its
inputs and options are unchanged), then the final stage into the output folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from merge_cli.merge import execute
from merge_cli.plan import build_plan
from merge_cli.recipe.schema import Recipe
from merge_cli.recipe.stages import load_stages, stage_recipe

STAMP = "stage.json"  # written into an intermediate output folder, next to manifest.json


def input_identity(folder: Path) -> str:
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    if folder.is_file():
        st = folder.stat()
        return f"{folder.name}:{st.st_size}:{st.st_mtime_ns}"
    items = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.name.endswith(".index.json")):
            st = f.stat()
            items.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(items)


def stage_key(recipe: Recipe, data: dict, options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    from merge_cli.io.checkpoint import resolve_model_path

    refs = (
        [recipe.base_model]
        + [m.model for m in recipe.models]
        + [src.model for s in recipe.slices for src in s.sources]
    )
    for ref in dict.fromkeys(r for r in refs if r):
        try:
            p = resolve_model_path(ref, recipe.base_dir)
        except Exception:  # not local (a hub reference): its name and revision are its identity
            h.update(ref.encode())
            continue
        h.update(f"{ref}={input_identity(p)}".encode())
    return h.hexdigest()


def run_stages(path: Path, out_dir: Path, *, intermediate_dir: Path | None, overwrite: bool, options, plan_kwargs: dict,
               overrides: dict | None = None, log=print) -> list[tuple[str, str]]:  # fmt: skip
    """Run every stage; returns (stage name, 'merged' | 'reused') in order. The final stage goes to out_dir."""
    out_dir = Path(out_dir)
    inter = Path(intermediate_dir) if intermediate_dir else out_dir.parent / f"{out_dir.name}.intermediate"
    src, stages, paths = load_stages(path, overrides, inter)
    done = []
    for s in stages:
        recipe = stage_recipe(s, src, path, paths, overrides)
        target = paths[s.name] if s.name else out_dir
        if s.name:
            key = stage_key(recipe, s.data, {"overrides": overrides or {}, **plan_kwargs})
            stamp = target / STAMP
            if stamp.is_file() and (target / "manifest.json").is_file():
                try:
                    if json.loads(stamp.read_text()).get("key") == key:
                        log(f"stage '{s.name}': unchanged, reusing {target}")
                        done.append((s.name, "reused"))
                        continue
                except (OSError, ValueError):
                    pass
        plan = build_plan(recipe, **plan_kwargs)
        try:
            log(f"stage '{s.name or 'final'}': merging {len(plan.jobs)} tensors into {target}")
            execute(plan, target, overwrite=overwrite if not s.name else True, options=options)
        finally:
            plan.close()
        if s.name:
            (target / STAMP).write_text(json.dumps({"stage": s.name, "key": key}, indent=1) + "\n")
        done.append((s.name or "final", "merged"))
    return done
