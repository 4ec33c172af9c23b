"""Tensor name -> (layer index, module group).

Groups: embed, attention, mlp, norm, lm_head, other. Layer index is the number after a layer
container such as `layers.`, `h.`, `blocks.`, `layer.` (None for tensors outside the layer stack).
"""

from __future__ import annotations

import re
from typing import NamedTuple

GROUPS = ("embed", "attention", "mlp", "norm", "lm_head", "other")

_LAYER_RE = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)(?:\.|$)"
)
_ANY_NUM_RE = re.compile(r"\.(\d+)\.")

# order matters: the first group whose pattern matches wins
_GROUP_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out|output|score)(\.|$)")),
    ("embed", re.compile(r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings|(^|\.)embed(dings)?(\.|$))")),
    ("norm", re.compile(r"(norm|ln_\d|ln_f|(^|\.)ln(\.|$)|layer_norm|layernorm)", re.I)),
    ("attention", re.compile(r"(self_attn|attention|(^|\.)attn(\.|$)|cross_attn|q_proj|k_proj|v_proj|o_proj|qkv|c_attn)")),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|w1|w2|w3|experts)")),
]  # fmt: skip


class ModuleInfo(NamedTuple):
    layer: int | None
    group: str


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1))
    m = _ANY_NUM_RE.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str:
    for group, pat in _GROUP_PATTERNS:
        if pat.search(name):
            return group
    return "other"


def classify(name: str) -> ModuleInfo:
    return ModuleInfo(layer_of(name), group_of(name))


def with_layer(name: str, old: int, new: int) -> str:
    """Rename the layer index of a tensor name (for slices that stack layers)."""
    m = _LAYER_RE.search(name) or _ANY_NUM_RE.search(name)
    if m is None or int(m.group(1)) != old:
        return name
    s, e = m.span(1)
    return name[:s] + str(new) + name[e:]
