"""Commands of the Hugging Face workflow: lock, push, check."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from merge_cli.commands.common import handle_errors, load_recipe_arg


@handle_errors
def lock(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Lock file to write (default: RECIPE.lock.yaml)."
    ),
    seed: int | None = typer.Option(None, help="Seed for random methods (overrides the recipe)."),
    allow_arch_mismatch: bool = typer.Option(False, help="Merge models whose config architectures differ."),
):
    """Resolve every model (hub commits, sha256 of every file the merge would read) into a lock file, without
    merging. Hub weights are not downloaded: their hashes come from the hub's LFS metadata."""
    from merge_cli.io.lock import LockBuilder, dump_lock
    from merge_cli.output.sidefiles import donor_side_files
    from merge_cli.plan import build_plan

    p = build_plan(load_recipe_arg(recipe, seed), allow_arch_mismatch=allow_arch_mismatch)
    try:
        data = LockBuilder(p, donor_side_files(p)).hash()
    finally:
        p.close()
    target = output or recipe.with_name(recipe.stem + ".lock.yaml")
    target.write_text(dump_lock(data))
    hub = sum(1 for m in data["models"] if "commit" in m or "base" in m)
    print(f"locked {len(data['models'])} model(s) ({hub} from the hub or with adapters) into {target}")


@handle_errors
def push(
    out_dir: Path = typer.Argument(..., help="A finished merge output folder."),
    repo_id: str = typer.Argument(..., help="Hub repo to create or update, e.g. you/my-merge."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str | None = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded; contact nothing."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
):
    """Publish a merge to the Hugging Face Hub (HfApi.create_repo + upload_folder; HF_TOKEN authenticates)."""
    from merge_cli.output.push import plan_push
    from merge_cli.output.push import push as do_push

    plan = plan_push(out_dir, repo_id, revision, private)
    where = (
        f"{plan.repo_id}" + (f"@{plan.revision}" if plan.revision else "") + (" (private)" if private else "")
    )
    if dry_run:
        for name, size in plan.files:
            print(f"{size:>14,d}  {name}")
        print(f"dry run: would upload {len(plan.files)} file(s), {plan.total_bytes / 1e6:.1f} MB to {where}")
        return
    url = do_push(plan, message)
    print(f"pushed {len(plan.files)} file(s), {plan.total_bytes / 1e6:.1f} MB to {where}: {url}")


@handle_errors
def check(
    out_dir: Path = typer.Argument(..., help="A merged model folder."),
    against: str | None = typer.Option(
        None, "--against", help="Reference model (folder or hub id); default: the base."
    ),
    max_ppl_ratio: float = typer.Option(
        1.5, min=1.0, help="Fail when perplexity / reference perplexity exceeds this."
    ),
    dtype: str = typer.Option("float32", help="Load dtype: float32, bfloat16, float16 or auto (as saved)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Sanity-check a merge with transformers: generations, perplexity, finiteness, against the base.
    Exit 3 when the model fails (non-finite logits, or perplexity ratio past --max-ppl-ratio)."""
    from merge_cli.output.check import CheckFailed, render, run_check

    if dtype not in ("float32", "bfloat16", "float16", "auto"):
        raise typer.BadParameter("use float32, bfloat16, float16 or auto", param_hint="--dtype")
    result = run_check(out_dir, against, max_ppl_ratio, dtype, device)
    print(json.dumps(result.to_json(), indent=1) if as_json else render(result))
    if not result.passed:
        raise CheckFailed("; ".join(result.reasons))
