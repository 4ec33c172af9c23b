"""Compression knobs, one set per module group (merge_cli.modules: embed, lm_head, attention, mlp, norm, other).

    scheme      svd | prune | dense | skip   (skip: the delta is dropped, the tensor stays the base's)
    keep        prune: fraction alpha of each row's entries kept, by largest |delta|      (0 < keep <= 1)
    value_bits  prune: 16 (bfloat16) or 32 (float32) for the kept values
    beta        svd: rank k = smallest k with sum_{i<=k} s_i^2 >= beta * sum s_i^2        (0 < beta <= 1)
    rank        svd: a fixed rank instead of beta (clamped to min(m, n))
    rank_fraction  svd: a fixed rank of int(rank_fraction * min(m, n)) instead of beta (Twin-Merging's
                density; 0 singular triplets when that is below 1)
    bands       svd: bits by band of singular index, largest first, e.g. "8:20,4:180,2:rest"
                (bits 2..8 quantize, 16 keeps bfloat16, 32 float32; the bands partition [0, k))

Tensors that are not 2-D are kept dense whatever their group says (biases, norms, scalars).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from merge_cli.errors import MergeCliError
from merge_cli.modules import GROUPS
from merge_cli.skillpack.quant import FLOAT_BITS, QUANT_BITS

SCHEMES = ("svd", "prune", "dense", "skip")
Band = tuple[int | None, int]  # (number of singular indices or None for "the rest", bits)


class SettingsError(MergeCliError):
    """A compression knob is unknown or out of range."""


@dataclass(frozen=True)
class GroupSettings:
    scheme: str
    keep: float = 0.1
    value_bits: int = 16
    beta: float = 0.9
    rank: int | None = None
    rank_fraction: float | None = None
    bands: tuple[Band, ...] = ((20, 8), (180, 4), (None, 2))

    def as_json(self) -> dict:
        d = asdict(self)
        d["bands"] = bands_text(self.bands)
        return d


_SVD = GroupSettings("svd")
DEFAULTS: dict[str, GroupSettings] = {
    "embed": GroupSettings("prune"),
    "lm_head": GroupSettings("prune"),
    "attention": _SVD,
    "mlp": _SVD,
    "norm": GroupSettings("dense"),
    "other": GroupSettings("dense"),
}


def bands_text(bands: tuple[Band, ...]) -> str:
    return ",".join(f"{b}:{'rest' if n is None else n}" for n, b in bands)


def parse_bands(text: str, where: str) -> tuple[Band, ...]:
    """'8:20,4:180,2:rest' -> ((20, 8), (180, 4), (None, 2)): bits:count, a count of 'rest' only last."""
    out: list[Band] = []
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    for i, part in enumerate(parts):
        bits_s, _, count_s = part.partition(":")
        try:
            bits = int(bits_s)
            count = None if count_s.strip() == "rest" else int(count_s)
        except ValueError:
            raise SettingsError(f"{where}: band '{part}' is not BITS:COUNT (e.g. 8:20 or 2:rest)") from None
        if bits not in QUANT_BITS and bits not in FLOAT_BITS:
            raise SettingsError(f"{where}: band '{part}' has {bits} bits; use 2..8, 16 or 32")
        if count is None and i != len(parts) - 1:
            raise SettingsError(f"{where}: only the last band may be 'rest'")
        if count is not None and count < 1:
            raise SettingsError(f"{where}: band '{part}' must cover at least one singular index")
        out.append((count, bits))
    if not out:
        raise SettingsError(f"{where}: no bands given; write e.g. 8:20,4:180,2:rest")
    if out[-1][0] is not None:
        out.append((None, out[-1][1]))  # indices past the listed bands keep the last band's bits
    return tuple(out)


def _value(key: str, raw, where: str):
    try:
        if key == "scheme":
            if raw not in SCHEMES:
                raise SettingsError(f"{where}: scheme '{raw}' is not one of {', '.join(SCHEMES)}")
            return raw
        if key == "rank_fraction":
            if raw is None or str(raw).lower() in ("none", "null", ""):
                return None
            v = float(raw)
            if not 0 <= v <= 1:
                raise SettingsError(f"{where}: rank_fraction must be in [0, 1], got {raw}")
            return v
        if key in ("keep", "beta"):
            v = float(raw)
            if not 0 < v <= 1:
                raise SettingsError(f"{where}: {key} must be in (0, 1], got {raw}")
            return v
        if key == "value_bits":
            v = int(raw)
            if v not in FLOAT_BITS:
                raise SettingsError(f"{where}: value_bits must be 16 or 32, got {raw}")
            return v
        if key == "rank":
            if raw is None or str(raw).lower() in ("none", "null", ""):
                return None
            v = int(raw)
            if v < 1:
                raise SettingsError(f"{where}: rank must be at least 1, got {raw}")
            return v
        if key == "bands":
            return parse_bands(raw, where)
    except (TypeError, ValueError):
        raise SettingsError(f"{where}: {key}={raw!r} is not a valid value") from None
    fields = ", ".join(GroupSettings.__dataclass_fields__)
    raise SettingsError(f"{where}: unknown knob '{key}'; the knobs are {fields}")


def with_overrides(overrides: dict[str, dict], base: dict[str, GroupSettings] | None = None):
    """DEFAULTS (or `base`) with {group: {knob: value}} applied; group 'all' sets every group."""
    out = dict(base or DEFAULTS)
    for group, knobs in overrides.items():
        targets = list(GROUPS) if group == "all" else [group]
        if group != "all" and group not in GROUPS:
            raise SettingsError(f"unknown module group '{group}'; use one of {', '.join(GROUPS)} or all")
        if not isinstance(knobs, dict):
            raise SettingsError(f"group '{group}': give its knobs as a mapping, e.g. {{rank: 64}}")
        for g in targets:
            vals = {k: _value(k, v, f"{g}.{k}") for k, v in knobs.items()}
            out[g] = replace(out[g], **vals)
    return out


def parse_set_options(items: list[str]) -> dict[str, dict]:
    """['mlp.rank=64', 'embed.keep=0.05'] -> {'mlp': {'rank': '64'}, 'embed': {'keep': '0.05'}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        group, dot, knob = key.strip().partition(".")
        if not eq or not dot or not knob:
            raise SettingsError(f"--set '{item}': write GROUP.KNOB=VALUE, e.g. mlp.rank=64")
        out.setdefault(group, {})[knob] = value.strip()
    return out


def settings_json(settings: dict[str, GroupSettings]) -> str:
    return json.dumps({g: s.as_json() for g, s in settings.items()}, sort_keys=True)
