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


def uniform_draws(seed: int, tensor: str, index: int, shape) -> torch.Tensor:
    """The documented draw contract, re-derived independently (tensors under 2^20 elements: one block):
    sha256(seed, name, index) seeds numpy's PCG64, which draws float32 uniforms."""
    import numpy as np

    digest = hashlib.sha256(f"{seed}\x00{tensor}\x00{index}".encode()).digest()
    g = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)))
    return torch.from_numpy(g.random(int(np.prod(shape)), dtype=np.float32)).reshape(tuple(shape))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)
