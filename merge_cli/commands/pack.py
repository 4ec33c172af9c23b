"""`merge-cli pack ...`: SkillPacks (GraftLLM): extract, inspect, apply (graft), remove, export-lora."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from merge_cli.commands.common import fail, handle_errors, out, size_arg

app = typer.Typer(
    help="SkillPacks: compress what a fine-tune learned (its delta from the base), graft it onto the base, "
    "combine or remove packs, export one as a PEFT LoRA. See docs/skillpacks.md.\n\n"
    "Flow: `merge-cli pack extract BASE FT math.skillpack`, `merge-cli pack inspect math.skillpack`, "
    "`merge-cli pack apply BASE math.skillpack OUT`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

MEMORY_HELP = "Memory budget, e.g. 4GB: row blocks are sized to it (default: 1/8 of free RAM, 1-16 GB)."


@contextlib.contextmanager
def _progress(total: int, what: str, quiet: bool):
    if quiet:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn(f"[bold]{what}[/bold]"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True))  # fmt: skip
    with bar:
        task = bar.add_task(what, total=total or 1)
        yield lambda n: bar.update(task, advance=n)


def _memory(value: Optional[str]) -> int:
    from merge_cli.engine import default_max_memory

    return size_arg(value, "--max-memory") or default_max_memory()


def _settings(beta, rank, keep, bands, sets, config) -> dict:
    from merge_cli.skillpack.settings import parse_set_options, with_overrides

    groups: dict[str, dict] = {}
    if config is not None:
        groups = dict(config)
    quick = {"beta": beta, "rank": rank, "bands": bands}
    for g in ("attention", "mlp"):
        groups.setdefault(g, {}).update({k: v for k, v in quick.items() if v is not None})
    if keep is not None:
        for g in ("embed", "lm_head"):
            groups.setdefault(g, {})["keep"] = keep
    for g, knobs in parse_set_options(sets or []).items():
        groups.setdefault(g, {}).update(knobs)
    return with_overrides(groups)


def _read_config(path: Path) -> tuple[dict, dict]:
    """A pack recipe: {base: ..., finetuned: ..., groups: {group: {knob: value}}} -> (refs, groups)."""
    import yaml

    from merge_cli.errors import RecipeError

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: unreadable pack recipe ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(data, dict) or set(data) - {"base", "finetuned", "groups"}:
        raise RecipeError(f"{path}: a pack recipe is a mapping with keys base, finetuned and groups")
    refs = {k: str(data[k]) for k in ("base", "finetuned") if data.get(k) is not None}
    # relative to the recipe's folder when that exists there (else a hub id or a path from the working dir)
    refs = {k: str(path.parent / v) if (path.parent / v).exists() else v for k, v in refs.items()}
    return refs, data.get("groups") or {}


@app.command("extract")
@handle_errors
def extract(
    args: list[str] = typer.Argument(..., help="BASE FINETUNED OUT.skillpack (or only OUT with --recipe)."),
    beta: Optional[float] = typer.Option(
        None,
        help="Attention and MLP: keep the smallest rank whose singular values hold this energy fraction "
        "(default 0.9).",
    ),  # fmt: skip
    rank: Optional[int] = typer.Option(None, help="Attention and MLP: a fixed SVD rank instead of --beta."),
    keep: Optional[float] = typer.Option(
        None, help="Embeddings and lm_head: fraction of each row's entries kept by magnitude (default 0.1)."
    ),
    bands: Optional[str] = typer.Option(
        None,
        help="Attention and MLP: bits by band of singular index, largest first (default 8:20,4:180,2:rest).",
    ),
    set_: Optional[list[str]] = typer.Option(
        None,
        "--set",
        help="Any knob of any module group, GROUP.KNOB=VALUE, repeatable, e.g. --set mlp.rank=64 "
        "--set norm.scheme=skip (groups: embed lm_head attention mlp norm other all).",
    ),  # fmt: skip
    recipe: Optional[Path] = typer.Option(
        None, help="A pack recipe YAML (base, finetuned, groups: {mlp: {rank: 64}}), e.g. for CI."
    ),
    fmt: str = typer.Option(
        "skillpack", "--format", help="skillpack, or peft: write a PEFT LoRA adapter folder."
    ),
    calibration: Optional[Path] = typer.Option(
        None,
        help="A text file: quantize SVD factors with GPTQ-style error compensation on the fine-tune's activations "
        "over it (needs transformers; loads the fine-tune whole). Default: round-to-nearest.",
    ),
    calibration_tokens: int = typer.Option(
        4096, min=2, help="Calibration: at most this many tokens of the text."
    ),
    damp: float = typer.Option(
        0.01, help="Calibration: GPTQ damping, as a fraction of the Hessian's mean diagonal (> 0)."
    ),
    max_memory: Optional[str] = typer.Option(None, help=MEMORY_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Compress FINETUNED - BASE into a SkillPack, tensor by tensor.

    Embeddings and lm_head are magnitude-pruned, attention and MLP projections truncated-SVD'd with
    their factors quantized in bands, norms and biases kept dense. Example:
    merge-cli pack extract ./base ./math-ft math.skillpack --beta 0.8
    """
    from merge_cli.errors import MergeCliError
    from merge_cli.io.refs import open_checkpoint
    from merge_cli.skillpack.extract import check_pair
    from merge_cli.skillpack.extract import extract as run_extract

    if damp <= 0:
        fail(f"--damp {damp}: GPTQ damping must be positive")
    if fmt not in ("skillpack", "peft"):
        fail(f"--format {fmt}: use skillpack or peft")
    refs, groups = _read_config(recipe) if recipe else ({}, None)
    if recipe is not None and len(args) == 1 and len(refs) == 2:
        base_ref, ft_ref, out_path = refs["base"], refs["finetuned"], Path(args[0])
    elif len(args) == 3:
        base_ref, ft_ref, out_path = args[0], args[1], Path(args[2])
    else:
        fail("give BASE FINETUNED OUT, or OUT with a --recipe naming base and finetuned")
    settings = _settings(beta, rank, keep, bands, set_, groups)
    if out_path.exists() and not overwrite:
        fail(f"output {out_path} already exists; pass --overwrite to replace it")
    budget = _memory(max_memory)
    base = open_checkpoint(base_ref)
    try:
        ft = open_checkpoint(ft_ref)
    except MergeCliError:
        base.close()
        raise
    try:
        check_pair(base, ft)  # mismatched models fail before any progress bar shows
        hessians = None
        if calibration is not None:
            from merge_cli.skillpack.calibrate import collect_hessians

            hessians = collect_hessians(ft.folder, calibration, max_tokens=calibration_tokens)
        target = out_path if fmt == "skillpack" else out_path.parent / f".{out_path.name}.skillpack.tmp"
        with _progress(base.total_bytes, "extracting", quiet) as advance:
            meta = run_extract(base, ft, target, settings, max_memory=budget, progress=advance, hessians=hessians,
                               damp=damp)  # fmt: skip
    finally:
        base.close()
        ft.close()
    if fmt == "peft":
        try:
            _export(target, out_path, "float32", overwrite)
        finally:
            target.unlink(missing_ok=True)
        return
    size = Path(meta["path"]).stat().st_size
    full = meta["totals"]["delta_bytes"]
    print(f"wrote {out_path}: {size / 1e6:.2f} MB, {full / max(size, 1):.1f}x smaller than the full delta "
          f"({full / 1e6:.2f} MB); `merge-cli pack inspect {out_path}` shows ranks, bits and errors")  # fmt: skip


def _export(pack_path: Path, out_dir: Path, dtype: str, overwrite: bool) -> None:
    from merge_cli.skillpack.format import Pack
    from merge_cli.skillpack.peft import export_lora

    pack = Pack(pack_path)
    try:
        info = export_lora(pack, out_dir, dtype=dtype, overwrite=overwrite)
    finally:
        pack.close()
    print(f"wrote PEFT adapter {out_dir}: {info['modules']} LoRA module(s), r={info['rank']} (rank_pattern for "
          f"the others), lora_alpha=r")  # fmt: skip
    if info["left_out"]:
        print(f"left out {len(info['left_out'])} pruned/dense tensor(s) (no LoRA form; "
              f"{100 * info['left_out_norm_fraction']:.1f}% of the delta's norm), e.g. {info['left_out'][0]}")  # fmt: skip


@app.command("inspect")
@handle_errors
def inspect(
    pack: Path = typer.Argument(..., help="A .skillpack file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    tensors: bool = typer.Option(False, help="One row per tensor instead of per module group."),
):
    """Show a pack's size, compression ratio, and per-module scheme, rank, bits and relative error.

    Example: merge-cli pack inspect math.skillpack --json
    """
    from merge_cli.skillpack.inspect import print_summary, summarize

    info = summarize(pack)
    if as_json:
        print(json.dumps(info, indent=1))
        return
    print_summary(info, out, per_tensor=tensors)


def _split_params(items: Optional[list[str]]) -> dict:
    import yaml

    params = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            fail(f"--param '{item}': write KEY=VALUE, e.g. density=0.5")
        params[key.strip()] = yaml.safe_load(value)
    return params


@app.command("apply")
@handle_errors
def apply(
    args: list[str] = typer.Argument(
        ..., help="BASE [PACK ...] OUT: the base, the packs to graft, the output folder."
    ),
    method: str = typer.Option(
        "sum",
        help="sum (base + sum_i w_i delta_i, GraftLLM's graft) or any merge method (`merge-cli methods`), "
        "e.g. ties, run over the models BASE+pack_i.",
    ),  # fmt: skip
    weights: Optional[str] = typer.Option(
        None, help="Per-pack weights by pack name or in order, e.g. math=1,code=0.5 (default 1 each)."
    ),
    param: Optional[list[str]] = typer.Option(
        None, help="A global parameter of --method, KEY=VALUE, repeatable, e.g. --param density=0.5."
    ),
    skip_base_check: bool = typer.Option(
        False,
        help="Do not verify the base's weight-file sha256 against the pack's (shapes are still checked).",
    ),
    max_memory: Optional[str] = typer.Option(None, help=MEMORY_HELP),
    overwrite: bool = typer.Option(
        False, help="Replace an existing output folder (only once the new one is complete)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Graft packs onto their base: write an HF model folder (base's layout, config and tokenizer files).

    One pack restores the fine-tune within the pack's reported error; several combine by --method.
    With no pack the output is the base, bitwise. Example:
    merge-cli pack apply ./base math.skillpack code.skillpack ./grafted --weights math=1,code=0.5
    """
    from merge_cli.skillpack.graft import apply as run_apply

    if len(args) < 2:
        fail("give BASE, the packs, and an output folder: BASE [PACK ...] OUT")
    base_ref, packs, out_dir = args[0], [Path(p) for p in args[1:-1]], Path(args[-1])
    final = run_apply(base_ref, packs, out_dir, method=method, weights=weights, params=_split_params(param),
                      overwrite=overwrite, verify_base=not skip_base_check, max_memory=_memory(max_memory),
                      bar=lambda total: _progress(total, "grafting", quiet))  # fmt: skip
    print(f"grafted {len(packs)} pack(s) onto {base_ref} into {final} (method {method})")


@app.command("remove")
@handle_errors
def remove(
    grafted: Path = typer.Argument(..., help="A folder written by `merge-cli pack apply`."),
    pack: Path = typer.Argument(..., help="The pack to take out (matched by its sha256)."),
    out_dir: Path = typer.Argument(..., help="Output folder."),
    base: Optional[str] = typer.Option(
        None, help="The base, if it moved since the graft (its sha256 is checked)."
    ),
    max_memory: Optional[str] = typer.Option(None, help=MEMORY_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Take one pack out of a grafted model: rebuilt from the recorded base and the remaining packs, so it is
    exact (forget-free: removing every pack gives the base bitwise). Example:
    merge-cli pack remove ./grafted code.skillpack ./math-only
    """
    from merge_cli.skillpack.graft import remove as run_remove

    final = run_remove(
        grafted, pack, out_dir, base_ref=base, overwrite=overwrite, max_memory=_memory(max_memory)
    )
    print(f"removed {pack.name} from {grafted} into {final}")


@app.command("export-lora")
@handle_errors
def export_lora(
    pack: Path = typer.Argument(..., help="A .skillpack file."),
    out_dir: Path = typer.Argument(..., help="Output PEFT adapter folder."),
    dtype: str = typer.Option("float32", help="Dtype of lora_A/lora_B: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Write the pack's SVD-compressed modules as a PEFT LoRA adapter (lora_A = V^T, lora_B = U*S, alpha = r).

    Load it with peft's PeftModel.from_pretrained(base_model, OUT_DIR). Example:
    merge-cli pack export-lora math.skillpack ./math-lora
    """
    from merge_cli.skillpack.peft import DTYPES

    if dtype not in DTYPES:
        fail(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    _export(pack, out_dir, dtype, overwrite)


@app.command("twin")
@handle_errors
def twin(
    args: list[str] = typer.Argument(..., help="BASE EXPERT [EXPERT ...] OUT_DIR."),
    method: str = typer.Option(
        "task_arithmetic",
        help="Merge method of the shared model (task_arithmetic uses lambda 0.3 unless --param).",
    ),
    param: Optional[list[str]] = typer.Option(
        None, help="A global parameter of --method, KEY=VALUE, repeatable."
    ),
    density: float = typer.Option(
        0.1,
        min=0.0,
        max=1.0,
        help="Exclusive packs keep int(density * min(m, n)) singular triplets per matrix.",
    ),
    set_: Optional[list[str]] = typer.Option(
        None,
        "--set",
        help="Override a knob of the exclusive packs, GROUP.KNOB=VALUE (e.g. embed.scheme=prune).",
    ),
    max_memory: Optional[str] = typer.Option(None, help=MEMORY_HELP),
    overwrite: bool = typer.Option(False, help="Replace existing outputs in OUT_DIR."),
):
    """Twin-Merging: a shared merge of the experts plus one exclusive pack per expert, relative to it.

    Writes OUT_DIR/shared (an HF model) and OUT_DIR/<expert>.skillpack. Then pick a task's model with
    `pack apply OUT_DIR/shared OUT_DIR/*.skillpack OUT --weights math=1,code=0`. Example:
    merge-cli pack twin ./base ./math ./code ./twin --density 0.1
    """
    from merge_cli.skillpack.settings import parse_set_options
    from merge_cli.skillpack.twin import twin as run_twin

    if len(args) < 3:
        fail("give BASE, at least one EXPERT, and OUT_DIR")
    out_dir = Path(args[-1])
    if (out_dir / "shared").exists() and not overwrite:
        fail(f"output {out_dir / 'shared'} already exists; pass --overwrite to replace it")
    res = run_twin(args[0], args[1:-1], out_dir, method=method, params=_split_params(param), density=density,
                   overrides=parse_set_options(set_ or []), overwrite=overwrite, max_memory=_memory(max_memory))  # fmt: skip
    names = ",".join(f"{n}=1" if i == 0 else f"{n}=0" for i, n in enumerate(res["packs"]))
    print(f"wrote {res['shared']} and {len(res['packs'])} exclusive pack(s); e.g. `merge-cli pack apply "
          f"{res['shared']} {' '.join(str(p) for p in res['packs'].values())} OUT --weights {names}`")  # fmt: skip
