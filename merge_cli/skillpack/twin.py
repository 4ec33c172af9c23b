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


TWIN_KEYS = ("name", "method", "base_model", "models", "parameters", "shard_size")


def is_twin_recipe(path: Path) -> bool:
    """A recipe whose `method:` is twin: `merge-cli run` writes the shared model and the exclusive packs."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("method") == "twin"


def load_twin_recipe(path: Path) -> dict:
    """The twin() arguments of a `method: twin` recipe, checked with one-line errors:

        method: twin
        base_model: ./base
        models: [./math, ./code]          # or {model: PATH} entries
        parameters: {shared_method: task_arithmetic, lambda: 0.3, density: 0.1}

    `shared_method` (default task_arithmetic) merges the shared model with the other parameters; `density`
    (default 0.1) is the fraction of singular triplets each exclusive pack keeps."""
    import yaml

    from merge_cli.errors import RecipeError, did_you_mean

    path = Path(path)
    data = yaml.safe_load(path.read_text())
    for k in data:
        if k not in TWIN_KEYS:
            raise RecipeError(f"{path}: unknown key '{k}' in a twin recipe{did_you_mean(k, TWIN_KEYS)}")
    if not isinstance(data.get("base_model"), str):
        raise RecipeError(
            f"{path}: a twin recipe needs `base_model:` (the model the experts were tuned from)"
        )
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{path}: a twin recipe needs `models:`, a non-empty list of the experts")
    refs = [m.get("model") if isinstance(m, dict) else m for m in models]
    if not all(isinstance(r, str) and r for r in refs):
        raise RecipeError(f"{path}: every entry of `models:` is a path or {{model: PATH}}")
    params = dict(data.get("parameters") or {})
    density = params.pop("density", 0.1)
    if not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise RecipeError(f"{path}: parameters.density must be a number in [0, 1] (got {density!r})")
    shared = params.pop("shared_method", "task_arithmetic")
    from merge_cli.methods import get_method

    get_method(shared, f"{path}: parameters.shared_method")

    def rel(ref: str) -> str:  # paths relative to the recipe's folder, as in merge recipes
        p = path.parent / ref
        return str(p) if not Path(ref).is_absolute() and p.exists() else ref

    return {"base_ref": rel(data["base_model"]), "experts": [rel(r) for r in refs], "method": shared,
            "params": params, "density": float(density)}  # fmt: skip
