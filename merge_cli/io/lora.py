"""LoRA / PEFT adapters as merge sources: a base checkpoint whose adapted tensors read as W + scale * B @ A.

Nothing is materialised: headers are the base's (with modules_to_save replacing whole tensors), and each
read computes the update for that one tensor (or those rows) in fp32, returned in the tensor's own dtype.
No peft import: the adapter folder (adapter_config.json + adapter_model.safetensors) is read directly.

PEFT key naming (the adapter name is stripped on save):
  base_model.model.<module>.lora_A.weight / lora_B.weight        linear/conv-1x1 LoRA on <module>.weight
  base_model.model.<module>.lora_embedding_A / lora_embedding_B  embedding LoRA (delta = (B @ A)^T)
  base_model.model.<module>.base_layer.weight                    replaces W (saved embeddings); LoRA adds on top
  base_model.model.<name>                                         modules_to_save, taken whole
scale = alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha honour rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.overlay import OverlayCheckpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "lora_bias": "adapters with a LoRA bias (lora_bias)",
    "trainable_token_indices": "trainable-token adapters",
    "layer_replication": "adapters with layer_replication",
}


@dataclass(frozen=True)
class LoraUpdate:
    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool  # delta = (B @ A)^T
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D): delta = (B @ A)^T


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: a pattern key matches a module name when the name ends with it on a '.' boundary."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _lora_scale(cfg: dict, module: str, rank: int) -> float:
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", rank))
    if r != rank:
        raise CheckpointError(
            f"adapter: '{module}' has rank {rank} in its weights but {r} in adapter_config.json"
        )
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def read_adapter_config(path: Path, where: str) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"adapter '{where}': unreadable {ADAPTER_CONFIG} ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"adapter '{where}': {ADAPTER_CONFIG} is not a JSON object")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise CheckpointError(
            f"adapter '{where}': peft_type {ptype} is not supported; only LoRA adapters merge"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(
                f"adapter '{where}': {what} are not supported yet; merge it with peft first"
            )
    return cfg


class LoraCheckpoint(OverlayCheckpoint):
    """`base` with a LoRA adapter applied on the fly. `adapter` holds the adapter tensors (headers only)."""

    def __init__(self, ref: str, base: Checkpoint, adapter: Checkpoint, config: dict, adapter_ref: str):
        super().__init__(ref, base, Path(f"{base.path}+{adapter.folder or adapter.path}"))
        self.adapter = adapter
        self.adapter_ref = adapter_ref
        self.adapter_config = config
        self.updates: dict[str, LoraUpdate] = {}
        self.replaced: dict[str, str] = {}  # base name -> adapter name (modules_to_save, saved embeddings)
        self._index()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"adapter '{self.adapter_ref}' on '{self.base.ref}': {what}")

    def _index(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        fan = bool(self.adapter_config.get("fan_in_fan_out"))
        for name in self.adapter.tensors:
            key = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
            key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
            if "lora_magnitude_vector" in key:
                raise self._fail("DoRA magnitude vectors are not supported yet")
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key) or re.fullmatch(
                r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?", key
            )
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = name
                continue
            target = key.replace(".base_layer.", ".")
            if target not in self.base.tensors:
                raise self._fail(f"tensor '{name}' replaces '{target}', which the base model does not have")
            self.replaced[target] = name
            self.tensors[target] = self.adapter.info(name)
        for module, ab in sorted(pairs.items()):
            emb = "lora_embedding_A" in ab or "lora_embedding_B" in ab
            a, b = (
                (ab.get("lora_embedding_A"), ab.get("lora_embedding_B"))
                if emb
                else (ab.get("lora_A"), ab.get("lora_B"))
            )
            if a is None or b is None:
                raise self._fail(f"module '{module}' has only one of its two LoRA matrices")
            target = module + ".weight"
            if target not in self.base.tensors:
                raise self._fail(f"module '{module}' is adapted but the base model has no tensor '{target}'")
            ia, ib, w = self.adapter.info(a), self.adapter.info(b), self.tensors[target]
            rank = ia.shape[0]
            if len(ia.shape) != 2 or len(ib.shape) != 2 or ib.shape[1] != rank:
                raise self._fail(
                    f"module '{module}': LoRA shapes {list(ia.shape)} and {list(ib.shape)} do not pair up"
                )
            out_shape = (ia.shape[1], ib.shape[0]) if (emb or fan) else (ib.shape[0], ia.shape[1])
            if len(w.shape) < 2 or tuple(w.shape[:2]) != out_shape or math.prod(w.shape[2:]) != 1:
                raise self._fail(
                    f"module '{module}': B @ A gives {list(out_shape)} but the base tensor is {list(w.shape)}"
                )
            scale = _lora_scale(self.adapter_config, module, rank)
            self.updates[target] = LoraUpdate(a, b, scale, emb, fan and not emb)

    # -- reads ----------------------------------------------------------------------------------
    def _delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        u = self.updates[name]
        a = self.adapter.read(u.a).float()
        b = self.adapter.read(u.b).float()
        if u.embedding or u.transpose:  # delta = (B @ A)^T; its rows are columns of A
            return (a[:, start:stop].T @ b.T) * u.scale
        return (b[start:stop] @ a) * u.scale

    def base_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        # a saved base layer (PEFT's `<module>.base_layer.weight`, e.g. resized embeddings) replaces W; LoRA adds on top
        if name in self.replaced:
            return self.adapter.read_rows(self.replaced[name], start, stop)
        return self.base.read_rows(name, start, stop)

    def delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        return self._delta_rows(name, start, stop) if name in self.updates else None

    def fetch(self, names=None) -> list[str]:
        """Download (hub) what reading `names` needs: the base's shards and the adapter."""
        got = []
        if hasattr(self.base, "fetch"):
            base_names = (
                None
                if names is None
                else [n for n in names if n not in self.replaced and n in self.base.tensors]
            )
            got += self.base.fetch(base_names)
        if hasattr(self.adapter, "fetch"):
            got += self.adapter.fetch()
        return got

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def describe(self) -> str:
        return f"{len(self.updates)} LoRA-adapted and {len(self.replaced)} replaced tensor(s)"
