"""SCE: Select, Calculate, Erase (FuseChat; METHODS.md §11, MERGEKIT.md §3), per tensor.

    T = stack(tau_i)
    Select (select_topk < 1): v = population variance over models per element; keep in every model only
        the k = int(count_nonzero(v) * select_topk) highest-variance positions (exact top-k, lowest index on ties)
    Calculate: w_i = mean(tau^_i^2) / sum_j mean(tau^_j^2)   (uniform when that sum is < 1e-6)
    Erase: elect the sign of sum_i tau^_i (TIES; a zero sum counts as +), M_i = [sign(tau^_i) = gamma]
    theta = theta0 + sum_i w_i M_i tau^_i / max(sum_i w_i M_i, 1e-6)

`numerics: mergekit` (the default of mergekit-format recipes) evaluates the selection and the weights as
mergekit 0.1.5 does, in the compute dtype: the variance there, torch.topk for the k positions (ties as
it orders them), w_i = mean(tau^_i^2) over the elements in the compute dtype divided by their sum (uniform
when |sum| < 1e-6). Row-chunked tensors keep the exact form.

Per-model `weight`s are accepted and not used (as in mergekit). With select_topk < 1 and identical models v = 0, k = 0
and the result is the base (documented behaviour of the method, kept).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from merge_cli.methods.base import (
    MethodParams,
    MethodSpec,
    Numerics,
    ParamSet,
    Streamed,
    TensorCtx,
    mergekit_numerics,
    numerics_param,
    per_model,
)
from merge_cli.methods.consensus import disjoint_merge, elect_sign
from merge_cli.methods.gta import Sel as _Sel
from merge_cli.methods.selection import topk_mask


class SceParams(MethodParams):
    weight: float = per_model(1.0, description="accepted for mergekit recipes; SCE computes its own weights")
    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of the non-zero-variance positions kept (1 = select nothing out)",
    )
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect")
    numerics: Numerics = numerics_param(
        "weights from float64 sums of squares; top-k ties by lowest index",
        "variance, torch.topk selection and weights in the compute dtype, as mergekit 0.1.5, to match its"
        " output bits (row-chunked tensors: exact)",
    )


def _energy_weights(sq: list[float], numel: int) -> list[float]:
    """w_i = mean(tau^_i^2) / sum_j mean(tau^_j^2) from float64 sums of squares; uniform below 1e-6."""
    energy = [x / max(numel, 1) for x in sq]
    total = sum(energy)
    return [e / total for e in energy] if total >= 1e-6 else [1.0 / len(sq)] * len(sq)


def _erase(base, stacked: torch.Tensor, w: list[float], st: dict) -> torch.Tensor:
    sign = elect_sign(stacked)
    num = disjoint_merge(list(stacked), w, sign, "sum")
    agree = (stacked * sign > 0).to(stacked.dtype)
    wt = torch.tensor(w, dtype=stacked.dtype, device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
    den = (wt * agree).sum(dim=0).clamp_min(1e-6)
    st["kept"] = [
        a + int(x) for a, x in zip(st["kept"], (stacked != 0).reshape(len(w), -1).sum(dim=1), strict=True)
    ]
    st["numel"] += base.numel()
    return base + num / den


def _record(st: dict, w: list[float], ctx: TensorCtx) -> None:
    ctx.stats["weights"] = w
    ctx.stats["kept_fraction"] = [k / max(st["numel"], 1) for k in st["kept"]]


def _sq(stacked: torch.Tensor) -> list[float]:
    return [float(x) for x in stacked.reshape(stacked.shape[0], -1).double().pow(2).sum(dim=1)]


def topk_count(var: torch.Tensor, select_topk: float, mergekit: bool, nonzero: int | None = None) -> int:
    """k = int(count_nonzero(var) * select_topk): for numerics: mergekit the count times the fraction as a
    tensor product (fp32), as mergekit forms it; otherwise in Python floats. `nonzero`: the count, when
    the caller has it."""
    nz = torch.count_nonzero(var) if nonzero is None else torch.tensor(nonzero, dtype=torch.int64)
    if mergekit:
        return int(nz * select_topk) if select_topk > 0 else 0
    return int(int(nz) * select_topk)


def _mergekit_select_and_weigh(stacked: torch.Tensor, select_topk: float) -> tuple[torch.Tensor, list[float]]:
    """numerics: mergekit: the selected task vectors and the weights, every step in the compute dtype."""
    if select_topk < 1.0:
        mask = torch.zeros_like(stacked[0])
        var = stacked.var(dim=0, unbiased=False)
        k = topk_count(var, select_topk, True)
        if k > 0:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        stacked = stacked * mask.unsqueeze(0)
    return stacked, mergekit_weights(stacked)


def mergekit_weights(stacked: torch.Tensor, squares: torch.Tensor | None = None) -> list[float]:
    """numerics: mergekit: w_i = mean(tau^_i^2) / sum_j, in the compute dtype (uniform below 1e-6);
    `squares`: stacked.square() when the caller has it (the fast kernels make it beside the mask)."""
    sq = stacked.square() if squares is None else squares
    energy = sq.reshape(stacked.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    return [float(x) for x in w]


def sce(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    stacked = torch.stack([t - base for t in tensors])
    if mergekit_numerics(p):
        stacked, w = _mergekit_select_and_weigh(stacked, p.select_topk)
        st = {"kept": [0] * len(tensors), "numel": 0}
        out = _erase(base, stacked, w, st)
        _record(st, w, ctx)
        return out
    if p.select_topk < 1.0:
        var = stacked.var(dim=0, unbiased=False)
        k = topk_count(var, p.select_topk, False)
        stacked = stacked * topk_mask(var, k).unsqueeze(0)
    w = _energy_weights(_sq(stacked), base.numel())
    st = {"kept": [0] * len(tensors), "numel": 0}
    out = _erase(base, stacked, w, st)
    _record(st, w, ctx)
    return out


# -- row chunks: pass 0 counts non-zero variances, passes 1-2 find the top-k variance threshold exactly
# (radix), pass 3 sums the squares of the selected entries; then every chunk is merged on its own.
def _init(p: ParamSet, ctx: TensorCtx, n: int) -> dict:
    return {"numel": 0, "nz": 0, "sel": None, "sq": [0.0] * n, "w": None, "kept": [0] * n, "p": p,
            "size": math.prod(ctx.shape)}  # fmt: skip


def _selected(st: dict, stacked: torch.Tensor) -> torch.Tensor:
    if st["p"].select_topk >= 1.0:
        return stacked
    var = stacked.var(dim=0, unbiased=False)
    return stacked * st["sel"].mask(var).unsqueeze(0)


def _gather(st, k, base, xs, p, ctx) -> None:
    stacked = torch.stack([x - base for x in xs])
    if p.select_topk < 1.0 and k < 3:
        var = stacked.var(dim=0, unbiased=False)
        if k == 0:
            st["nz"] += int(torch.count_nonzero(var))
        elif st["sel"].radix is not None:
            st["sel"].radix.update(var)
    elif k == 3:
        st["sq"] = [a + b for a, b in zip(st["sq"], _sq(_selected(st, stacked)), strict=True)]


def _end_pass(st, k) -> None:
    sel = st["sel"]
    if k == 0:
        st["sel"] = _Sel(int(st["nz"] * st["p"].select_topk), st["size"])
    elif k == 1 and sel.radix is not None:
        sel.radix.next_pass()
    elif k == 2 and sel.radix is not None:
        sel.thr = sel.radix.result()
    elif k == 3:
        st["w"] = _energy_weights(st["sq"], st["size"])
        sel.seen = 0  # the masks are applied again, in order, when merging


STREAM = Streamed(
    init=_init,
    passes=4,
    gather=_gather,
    end_pass=_end_pass,
    apply=lambda st, b, xs, w, p, ctx: _erase(
        b, _selected(st, torch.stack([x - b for x in xs])), st["w"], st
    ),
    finish=lambda st, ctx: _record(st, st["w"], ctx),
)


SPEC = MethodSpec(
    name="sce",
    title="SCE (select high-variance positions, weight by energy, erase sign conflicts)",
    paper="Wan, Zhong, Yang, Chen, Quan 2024, FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990",
    params=SceParams,
    kernel=sce,
    streamed=STREAM,
    needs_base=True,
    summary="theta = theta0 + sum_i w_i M_i tau^_i / sum_i w_i M_i,  w_i ~ mean(tau^_i^2),  tau^ = top-variance positions",
    mergekit_defaults={"numerics": "mergekit"},
)

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: on the CPU, in fp32, bf16
# and fp16, whole tensors and row chunks (bitwise the plain kernel above; docs/methods.md).
FAST_KERNELS: dict[str, tuple[str, ...]] = {
    "sce": (
        "merge_cli.kernels.sce.run_sce",
        "merge_cli.kernels.sce.SceChunks",
        "merge_cli.kernels.sce.prep",
        "merge_cli.kernels.sce.select",
        "merge_cli.kernels.sce.topk_set",
        "merge_cli.kernels.sce.erase",
    ),
}
