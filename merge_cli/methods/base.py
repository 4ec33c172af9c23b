"""The method contract: a pure kernel over the tensors of one output tensor, with typed parameters.

    kernel(base, tensors, weights, params, ctx) -> Tensor

`params` is a ParamSet: global parameters as plain numbers, per-model parameters as tuples (one value per
source model, in order). Parameters are resolved at plan time; a kernel never parses names or reads files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    """Base class of every method's parameter model (defaults, ranges, docs)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @classmethod
    def per_model_fields(cls) -> set[str]:
        return {n for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("per_model")}

    @classmethod
    def key_of(cls, field_name: str) -> str:
        """The name recipes use (the alias, e.g. 'lambda' for lambda_)."""
        f = cls.model_fields[field_name]
        return f.alias or field_name

    @classmethod
    def field_of(cls, key: str) -> str | None:
        for name, f in cls.model_fields.items():
            if key in (name, f.alias):
                return name
        return None

    @classmethod
    def recipe_keys(cls) -> list[str]:
        return [cls.key_of(n) for n in cls.model_fields]


def per_model(default: Any, **kw) -> Any:
    """A parameter given per source model (in `models[].parameters`); a top-level value is the default."""
    return Field(default, json_schema_extra={"per_model": True}, **kw)


# How a method evaluates its internal coefficients: "exact" (merge-cli's default: float64, closed forms)
# or "mergekit" (mergekit 0.1.5's arithmetic: its formula, order and dtype, rounding included). A method
# that has it sets `mergekit_defaults={"numerics": "mergekit"}`, so mergekit-format recipes get the latter.
Numerics = Literal["exact", "mergekit"]


def numerics_param(exact: str, mergekit: str, *, mergekit_default: bool = True) -> Any:
    """The `numerics` parameter of a method with an exact and a mergekit-compatible evaluation
    (mergekit_default: whether mergekit-format recipes get the latter, as the method's mergekit_defaults say)."""
    when = (
        "the default of mergekit-format recipes"
        if mergekit_default
        else "opt-in, also for mergekit-format recipes"
    )
    return Field("exact", description=f"exact: {exact}; mergekit ({when}): {mergekit}")


def mergekit_numerics(p: Any) -> bool:
    """Whether these parameters ask for mergekit's arithmetic (`numerics: mergekit`)."""
    return getattr(p, "numerics", "exact") == "mergekit"


class ParamSet:
    """Resolved parameters of one tensor: globals as scalars, per-model parameters as tuples."""

    def __init__(self, values: dict[str, Any]):
        self._values = dict(values)
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self._values.items()}

    def __repr__(self) -> str:
        return f"ParamSet({self._values})"


def seed_for(seed: int, name: str, model_index: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_key(seed: int, name: str, model_index: int) -> tuple[int, int]:
    """The two 32-bit halves (k0, k1) of seed_for(seed, name, model index): the key of that model's draws
    for that tensor."""
    key = seed_for(seed, name, model_index)
    return key & 0xFFFFFFFF, key >> 32


def _mix32(x):
    """A bijective 32-bit xor-shift-multiply mixer (numpy uint32 arrays wrap, as C's uint32_t does)."""
    import numpy as np

    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x21F0AAAD)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x735A2D97)
    return x ^ (x >> np.uint32(15))


_M32 = 0xFFFFFFFF
_DRAW_PIECE = 1 << 24  # positions per piece of counter_uniform_on (a few int64 temporaries of 128 MiB)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors of 32-bit values, without int64 overflow: c is split in 16-bit
    halves, so every product stays below 2^48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32_torch(x: torch.Tensor) -> torch.Tensor:
    """_mix32 on int64 tensors holding 32-bit values (any device)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def counter_uniform_on(k0: int, k1: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """counter_uniform computed with torch integer ops on `device` (the CUDA path draws where it merges,
    instead of hashing on the CPU and copying 4 bytes per element across): the same bits. Made in pieces
    of `_DRAW_PIECE` positions, so the int64 temporaries stay bounded whatever the tensor's size."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, _DRAW_PIECE):
        j = torch.arange(start + s, start + min(n, s + _DRAW_PIECE), dtype=torch.int64, device=device)
        x = _mix32_torch((j & _M32) ^ k0)
        x = _mix32_torch((x + (k1 ^ _mul32(j >> 32, 0x9E3779B9))) & _M32)
        out[s : s + j.numel()] = (x >> 8).to(torch.float32) * 2.0**-24
    return out


def counter_uniform(k0: int, k1: int, start: int, n: int) -> torch.Tensor:
    """float32 uniforms in [0, 1) for flat positions start..start+n under key (k0, k1), on the CPU: the
    position j is hashed (two rounds of _mix32 with the key folded in, the high half of j too), and the top
    24 bits of the hash make the float, as numpy makes float32 uniforms. A counter hash, not a sequential
    generator: any range is drawn directly, so draws do not depend on chunking, order or thread count.
    The native kernels (merge_cli/kernels/native) compute the same bits, and are used here when available."""
    import numpy as np

    from merge_cli.kernels import native

    if native.lib() is not None:
        return native.uniform(n, start, k0, k1)
    with np.errstate(over="ignore"):
        j = np.arange(start, start + n, dtype=np.uint64)
        x = _mix32((j & np.uint64(0xFFFFFFFF)).astype(np.uint32) ^ np.uint32(k0))
        hi = (j >> np.uint64(32)).astype(np.uint32) * np.uint32(0x9E3779B9)
        x = _mix32(x + (np.uint32(k1) ^ hi))
        return torch.from_numpy((x >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24))


@dataclass
class TensorCtx:
    """What a kernel may know about the tensor it merges, and where it reports statistics.

    When the engine feeds a huge tensor in row chunks, `offset` is the flat index of the chunk's first
    element and `shape` the whole tensor's shape (otherwise offset 0 and the tensor's own shape)."""

    name: str
    layer: int | None = None
    group: str = "other"
    seed: int = 0
    num_layers: int | None = None  # layers of the reference model (layer_swap)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. whole-model statistics from a first pass
    offset: int = 0
    shape: tuple[int, ...] | None = None
    # the kernel holds the only references to `tensors` (wholemodel.gathered): it may overwrite them in
    # place or drop them from the list once used, to lower its peak memory (base stays untouched)
    owns_inputs: bool = False

    def uniform(self, model_index: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Uniform [0, 1) draws for the elements of this tensor (or chunk at `offset`): the counter hash of
        each element's flat position under the key of (seed, tensor name, model index) (counter_uniform),
        so they are bitwise the same on every device, in any order, and whether the tensor is processed
        whole or in chunks."""
        n = math.prod(tuple(shape))
        key = draw_key(self.seed, self.name, model_index)
        if self.device.type == "cpu":
            u = counter_uniform(*key, self.offset, n)
        else:  # drawn where it is used: no CPU hashing and no copy of the draws across
            u = counter_uniform_on(*key, self.offset, n, self.device)
        return u.reshape(tuple(shape))


@dataclass(frozen=True)
class Streamed:
    """How a method merges a tensor fed in row chunks (tensors too large to hold whole, like embeddings).

    The engine calls init once, then for each statistics pass p < passes: gather(state, p, base, xs,
    params, ctx) on every chunk in order and end_pass(state, p); then apply(state, base, xs, weights,
    params, ctx) on every chunk in order, which returns that chunk of the output."""

    init: Callable[..., Any]  # (params, ctx, n_models) -> state
    apply: Callable[..., torch.Tensor]
    passes: int = 0
    gather: Callable[..., None] | None = None
    end_pass: Callable[..., None] | None = None
    finish: Callable[..., None] | None = None  # (state, ctx): write whole-tensor stats into ctx.stats


Kernel = Callable[[torch.Tensor | None, list[torch.Tensor], list[float], ParamSet, TensorCtx], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its kernel, parameters and the metadata the card and report read."""

    name: str
    title: str
    paper: str
    params: type[MethodParams]
    kernel: Kernel
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    # the base model is optional: when the recipe names one it is passed as `base` (not as a source)
    optional_base: bool = False
    summary: str = ""
    # optional plan-time check of one tensor's resolved parameters: returns an error text or None
    check: Callable[[ParamSet, int], str | None] | None = None
    # mergekit compatibility: the parameter values mergekit uses for this method when a mergekit-format
    # recipe leaves them unset (where they differ from ours). None: mergekit has no such method.
    mergekit_defaults: dict[str, Any] | None = None
    # whole-model methods: a merge_cli.engine.stats.WholeModelStats subclass, gathered in streamed passes before
    # the merge; kernels then find its statistics in ctx.extra
    stats: type | None = None
    # optional plan-time check over every job of this method: (ParamSets, num_layers) -> error text or None
    plan_check: Callable[[list[ParamSet], int | None], str | None] | None = None
    # chunked execution: elementwise kernels run on row chunks as they are; others may give a Streamed form
    elementwise: bool = False
    streamed: Streamed | None = None
