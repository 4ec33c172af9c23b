"""RAM and RAM+ (Reinforced Agent Merging; MERGEKIT.md §3), per tensor, elementwise.

An entry of tau_i is active when |tau_i| > epsilon. Per element:
    no model active       -> theta0
    exactly one active    -> theta0 + tau_i            (a unique update is kept, not diluted)
    several active        -> theta0 + mean of the active tau_i   (shared updates are averaged)
ramplus_tl (RAM+, tensor level) scales model i's unique updates by 1 + r * clip(s_i / u_i, 0, alpha), where
s_i and u_i count model i's shared and unique active entries in this tensor (u_i = 0: no unique entries).
Per-model weights are not used.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, Streamed, TensorCtx

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}

PAPER = (
    "Yuan, Shi, Zhang, Liu, Yao, Vosoughi, Lee 2026, Behavior Knowledge Merge in Reinforced Agentic Models, "
    "arXiv:2601.13572"
)


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="|tau| above this counts as an update (active entry)")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0.0, description="strength of the rescale of unique updates")
    alpha: float = Field(0.2, ge=0.0, description="cap on the shared/unique ratio")


def _sets(base: torch.Tensor, tensors: list[torch.Tensor], eps: float):
    deltas = torch.stack([t - base for t in tensors])
    active = deltas.abs() > eps
    count = active.sum(dim=0)
    return deltas, active, count, active & (count == 1), active & (count > 1)


def _scales(unique: list[int], shared: list[int], r: float, alpha: float) -> list[float]:
    return [
        1.0 + r * min(max(s / u, 0.0), alpha) if u > 0 else 1.0 for u, s in zip(unique, shared, strict=True)
    ]


def _merge(base, tensors, eps: float, scales: list[float], st: dict) -> torch.Tensor:
    deltas, active, count, unique, shared = _sets(base, tensors, eps)
    sc = torch.tensor(scales, dtype=deltas.dtype, device=deltas.device).reshape(-1, *([1] * base.dim()))
    uniq = (deltas * unique * sc).sum(dim=0)
    shar = (deltas * shared).sum(dim=0) / count.clamp_min(1).to(deltas.dtype)
    st["active"] = [
        a + int(x) for a, x in zip(st["active"], active.reshape(len(tensors), -1).sum(dim=1), strict=True)
    ]
    st["shared"] += int((count > 1).sum())
    st["numel"] += base.numel()
    return base + torch.where(count > 1, shar, uniq)


def _new(n: int) -> dict:
    return {"active": [0] * n, "shared": 0, "numel": 0, "u": [0] * n, "s": [0] * n, "scales": [1.0] * n}


def _record(st: dict, ctx: TensorCtx) -> None:
    n = max(st["numel"], 1)
    ctx.stats["kept_fraction"] = [a / n for a in st["active"]]
    ctx.stats["shared_fraction"] = st["shared"] / n
    ctx.stats["unique_scale"] = st["scales"]


def _count(st: dict, base, tensors, eps: float) -> None:
    _, _, _, unique, shared = _sets(base, tensors, eps)
    n = len(tensors)
    st["u"] = [a + int(x) for a, x in zip(st["u"], unique.reshape(n, -1).sum(dim=1), strict=True)]
    st["s"] = [a + int(x) for a, x in zip(st["s"], shared.reshape(n, -1).sum(dim=1), strict=True)]


def _rp(p: ParamSet) -> tuple[float, float]:
    return (getattr(p, "r", 0.0), getattr(p, "alpha", 0.0))


def ram(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    st = _new(len(tensors))
    r, alpha = _rp(p)
    if r:
        _count(st, base, tensors, p.epsilon)
        st["scales"] = _scales(st["u"], st["s"], r, alpha)
    out = _merge(base, tensors, p.epsilon, st["scales"], st)
    _record(st, ctx)
    return out


def _end(st: dict, k: int, p: ParamSet) -> None:
    st["scales"] = _scales(st["u"], st["s"], *_rp(p))


def _streamed(passes: int) -> Streamed:
    """Row chunks: RAM is elementwise; RAM+ counts unique/shared entries per model in one pass first."""
    return Streamed(
        init=lambda p, ctx, n: {**_new(n), "p": p},
        apply=lambda st, b, xs, w, p, ctx: _merge(b, xs, p.epsilon, st["scales"], st),
        passes=passes,
        gather=lambda st, k, b, xs, p, ctx: _count(st, b, xs, p.epsilon),
        end_pass=lambda st, k: _end(st, k, st["p"]),
        finish=_record,
    )


RAM = MethodSpec(
    name="ram",
    title="RAM (keep unique updates, average shared ones)",
    paper=PAPER,
    params=RamParams,
    kernel=ram,
    streamed=_streamed(0),
    needs_base=True,
    summary="theta = theta0 + (tau_i where only model i changed; mean of the changed tau_i where several did)",
    mergekit_defaults={},
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    title="RAM+ (RAM with unique updates rescaled by the shared/unique ratio, per tensor)",
    paper=PAPER,
    params=RamPlusParams,
    kernel=ram,
    streamed=_streamed(1),
    needs_base=True,
    summary="RAM with unique tau_i scaled by 1 + r * clip(shared_i / unique_i, 0, alpha)",
    mergekit_defaults={},
)
