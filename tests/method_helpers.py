"""Helpers for method tests: call a registered kernel directly with plain parameters."""

from __future__ import annotations

import hashlib

import torch

from merge_cli.methods import METHODS, ParamSet, TensorCtx


def params_for(name: str, n: int, per_model: dict | None = None, **glob) -> ParamSet:
    """A ParamSet as the planner would build it: globals by recipe key, per-model values as lists."""
    spec = METHODS[name]
    pm = spec.params.per_model_fields()
    insts = []
    for i in range(n):
        vals = dict(glob)
        for k, v in (per_model or {}).items():
            vals[k] = v[i]
        insts.append(spec.params.model_validate(vals))
    return ParamSet(
        {
            f: (tuple(getattr(x, f) for x in insts) if f in pm else getattr(insts[0], f))
            for f in spec.params.model_fields
        }
    )


def run_kernel(name, base, tensors, *, per_model=None, seed=0, tensor="w", **glob):
    """(output, stats) of method `name` on one tensor."""
    spec = METHODS[name]
    p = params_for(name, len(tensors), per_model, **glob)
    weights = list(p.weight) if "weight" in spec.params.per_model_fields() else [1.0] * len(tensors)
    ctx = TensorCtx(name=tensor, seed=seed)
    out = spec.kernel(base, [t.clone() for t in tensors], weights, p, ctx)
    return out, ctx.stats


def check_error(name, n, per_model=None, **glob):
    spec = METHODS[name]
    return spec.check(params_for(name, n, per_model, **glob), n) if spec.check else None


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def counter_draw(k0: int, k1: int, j: int) -> float:
    """The documented draw of flat position j under key (k0, k1), in plain Python integers: two rounds of
    the mixer with the key folded in (and the high half of j), top 24 bits as a float in [0, 1)."""
    x = _mix32((j & 0xFFFFFFFF) ^ k0)
    x = _mix32((x + (k1 ^ (((j >> 32) * 0x9E3779B9) & 0xFFFFFFFF))) & 0xFFFFFFFF)
    return (x >> 8) / 2.0**24


def uniform_draws(seed: int, tensor: str, index: int, shape, offset: int = 0) -> torch.Tensor:
    """The documented draw contract, re-derived independently: sha256(seed, name, index) gives the 64-bit
    key (k0 = low half, k1 = high half), and element j of the tensor draws counter_draw(k0, k1, j)."""
    digest = hashlib.sha256(f"{seed}\x00{tensor}\x00{index}".encode()).digest()
    key = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    n = int(torch.Size(shape).numel())
    vals = [counter_draw(key & 0xFFFFFFFF, key >> 32, offset + j) for j in range(n)]
    return torch.tensor(vals, dtype=torch.float32).reshape(tuple(shape))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)
