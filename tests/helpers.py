"""Shared test helpers: tiny HF checkpoints written with the safetensors library, recipes, CLI runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from merge_cli.cli import app
from merge_cli.demo import TINY_CONFIG, fine_tune_like, llama_state_dict, save_hf

__all__ = [
    "TINY_CONFIG", "fine_tune_like", "llama_state_dict", "save_hf", "write_model", "write_recipe",
    "run_cli", "run_cli_subprocess", "load_output", "tiny_family",
]  # fmt: skip


def write_model(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1
) -> Path:
    """An HF-layout folder holding exactly these tensors (in their own dtypes), single-file or sharded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(tensors)
        per = -(-len(names) // shards)
        wm = {}
        for k in range(shards):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            wm.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_recipe(path: Path, recipe: dict | str) -> Path:
    path = Path(path)
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str):
    """Run the typer app in-process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_cli_subprocess(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "merge_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def merge_in_process(tmp_path: Path, recipe: Path, label: str, **options):
    """(output tensors, MergeOutcome) of one in-process merge of `recipe` into tmp_path / label, with
    EngineOptions(**options)."""
    from merge_cli.engine import EngineOptions
    from merge_cli.merge import execute
    from merge_cli.plan import build_plan
    from merge_cli.recipe import load_recipe

    plan = build_plan(load_recipe(recipe))
    try:
        result = execute(plan, tmp_path / label, options=EngineOptions(**options))
    finally:
        plan.close()
    return load_output(tmp_path / label), result


def load_output(out_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written model, read back with the safetensors library (an independent reader)."""
    out = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tiny_family(
    root: Path, n_experts: int = 3, dtype=torch.float32, cfg: dict | None = None
) -> dict[str, Path]:
    """A tiny Llama base plus n fine-tuned-like experts (the last one sharded), saved in `dtype`."""
    cfg = dict(cfg or TINY_CONFIG)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[
        dtype
    ]
    base = llama_state_dict(cfg, torch.Generator().manual_seed(7))
    paths = {"base": root / "base"}
    save_hf(paths["base"], base, cfg, dtype=dtype)
    for k in range(n_experts):
        name = f"expert{k}"
        paths[name] = root / name
        sd = fine_tune_like(base, torch.Generator().manual_seed(100 + k), scale=0.05)
        save_hf(paths[name], sd, cfg, dtype=dtype, shards=2 if k == n_experts - 1 else 1)
    return paths


CHUNKED_EMB = "model.embed_tokens.weight"


def chunked_family(
    tmp_path: Path, dtype=torch.bfloat16, seed: int = 21, spread: bool = False
) -> dict[str, Path]:
    """A base and three experts with a big 'embedding' (3000 x 64) that a small memory budget merges in row
    chunks, a quarter of its rows unchanged (exact ties at zero, zero variance), deltas quantised to 2^-7
    steps (ties at thresholds and in variances); expert 2 adds small noise. spread: expert i's steps are
    scaled by i + 1 (experts that differ in energy)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        CHUNKED_EMB: torch.randn(3000, 64, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).to(dtype),
        "model.norm.weight": torch.ones(64).to(dtype),
    }
    paths = {"base": write_model(tmp_path / "base", base)}
    for i in range(3):
        sd = {}
        for k, v in base.items():
            q = 2.0**-7 * torch.randint(-4, 5, v.shape, generator=g).float() * ((1 + i) if spread else 1)
            sd[k] = (v.float() + q + 0.003 * torch.randn(v.shape, generator=g) * (i == 1)).to(dtype)
        sd[CHUNKED_EMB][::4] = base[CHUNKED_EMB][::4]
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", sd)
    return paths
