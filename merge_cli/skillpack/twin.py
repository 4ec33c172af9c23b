"""Twin-Merging on packs (METHODS.md §14): a shared merge plus one exclusive pack per expert.

    theta* = merge(base, experts)                (task arithmetic with lambda 0.3 by default, or any method)
    v_t    = SVD_top(theta_t - theta*)           per 2-D tensor the top int(density * min(m, n)) singular
                                                 triplets (none when that is below 1), 1-D tensors dense
Then `pack apply SHARED v_1 ... v_T OUT --weights t=1,others=0` gives theta* + sum_t w_t v_t: the task's
model when its weight is 1 and the rest 0 (= theta_t when density is 1), uniform with 1/T each. The
exclusive packs are relative to theta*, not to the base. A learned router is out of scope.
"""

from __future__ import annotations

from pathlib import Path

from merge_cli.io.refs import open_checkpoint
from merge_cli.modules import GROUPS
from merge_cli.skillpack.extract import extract
from merge_cli.skillpack.graft import pack_name, run_recipe
from merge_cli.skillpack.settings import with_overrides


def twin_settings(density: float, overrides: dict[str, dict] | None = None):
    """Every 2-D tensor SVD'd to int(density * min(m, n)) triplets, factors in fp32 (Twin keeps them in float)."""
    knobs = {"scheme": "svd", "rank_fraction": density, "bands": "32:rest"}
    groups = {g: dict(knobs) for g in GROUPS}
    for g, extra in (overrides or {}).items():
        for target in GROUPS if g == "all" else [g]:
            groups.setdefault(target, {}).update(extra)
    return with_overrides(groups)


def twin(base_ref: str, experts: list[str], out_dir: Path, *, method: str = "task_arithmetic",
         params: dict | None = None, density: float = 0.1, overrides: dict | None = None,
         overwrite: bool = False, max_memory: int) -> dict:  # fmt: skip
    """Write out_dir/shared (the merged model) and out_dir/<expert>.skillpack for each expert."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_abs = str(Path(base_ref).resolve()) if Path(base_ref).exists() else base_ref
    refs = [str(Path(e).resolve()) if Path(e).exists() else e for e in experts]
    params = dict(params or {})
    if method == "task_arithmetic":
        params.setdefault("lambda", 0.3)
    recipe = {"method": method, "base_model": base_abs, "models": [{"model": r} for r in refs]}
    if params:
        recipe["parameters"] = params
    shared = run_recipe(recipe, out_dir / "shared", overwrite=overwrite, max_memory=max_memory)
    settings = twin_settings(density, overrides)
    packs = {}
    theta = open_checkpoint(str(shared))
    try:
        for ref in refs:
            name = pack_name(Path(ref.rstrip("/")))
            ft = open_checkpoint(ref)
            try:
                meta = extract(theta, ft, out_dir / f"{name}.skillpack", settings, max_memory=max_memory)
            finally:
                ft.close()
            packs[name] = Path(meta["path"])
    finally:
        theta.close()
    return {"shared": shared, "packs": packs}
