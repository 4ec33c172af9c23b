"""A pack's SVD-compressed modules as a PEFT LoRA adapter folder.

For a module N.weight packed as U S V^T (rank k): lora_B = dequant(U) * S [m, k], lora_A = dequant(V^T) [k, n],
lora_alpha = r = k, so PEFT's scaling alpha / r is 1 and W + B @ A is the graft. Modules of another rank
than the most common one are listed in rank_pattern / alpha_pattern. Pruned, dense and 1-D tensors have no
LoRA form; they are left out and counted in the summary.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge_cli.errors import OutputError
from merge_cli.skillpack.compress import load_factor
from merge_cli.skillpack.format import Pack

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_factors(pack: Pack, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [m, k], A [k, n]) in float32 with B @ A = the decompressed delta of an svd tensor."""
    e = pack.tensors[name]
    m, n = e["shape"]
    s = pack.get(f"{name}::S").float()
    bs, as_ = [], []
    for j, band in enumerate(e["bands"]):
        a, b, bits = band["start"], band["stop"], band["bits"]
        bs.append(load_factor(pack.get, f"{name}::U.{j}", bits, b - a, m).T * s[a:b])
        as_.append(load_factor(pack.get, f"{name}::V.{j}", bits, b - a, n))
    return torch.cat(bs, 1).contiguous(), torch.cat(as_, 0).contiguous()


def export_lora(pack: Pack, out_dir: Path, *, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write adapter_config.json + adapter_model.safetensors; returns a summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputError(f"output {out_dir} already exists; pass --overwrite to replace it")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    left_out: list[str] = []
    left_norm = total_norm = 0.0
    for name, e in pack.tensors.items():
        total_norm += e.get("delta_norm", 0.0) ** 2
        if e["scheme"] == "svd" and e["rank"] > 0 and name.endswith(".weight"):
            module = name[: -len(".weight")]
            b, a = lora_factors(pack, name)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(DTYPES[dtype])
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(DTYPES[dtype])
            ranks[module] = e["rank"]
        elif e["scheme"] not in ("zero", "skip"):
            left_out.append(name)
            left_norm += e.get("delta_norm", 0.0) ** 2
    if not ranks:
        raise OutputError(f"pack {pack.path} has no SVD-compressed module; nothing has a LoRA form")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": (pack.meta.get("base") or {}).get("ref"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "task_type": None,
    }
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {
        "modules": len(ranks),
        "rank": r,
        "left_out": left_out,
        "left_out_norm_fraction": (left_norm / total_norm) ** 0.5 if total_norm else 0.0,
        "path": str(out_dir),
    }
