"""PCB-Merging: parameter competition balancing (METHODS.md §7), whole-model by default.

Per task row T_i (the whole flattened model at granularity `model`, one tensor at `tensor`):
  lo/hi = the |T_i| order statistics at int(d*q) and int(d*(1-q))-1;  A = clip(|T|, lo, hi);  Tc = sign(T)*A
  S_intra = exp(N * minmax(A)^2);   S_inter = tanh(T * sum_j T_j)  (sum_raw)
                                    or sum_j tanh(Tn_i * Tn_j), Tn = sign(T)*minmax(A)  (pairwise_norm)
  B = S_intra * S_inter;  c = sorted(B)[int(d*(1-r))];  W = minmax(max(B, c))
  theta = theta0 + sum_i lambda_i Tc_i W_i / max(sum_i W_i, 1e-12)
Since lo and hi are elements of |T_i|, min(A) = lo and max(A) = hi; since c is an element of B_i,
min(max(B, c)) = c. So the whole-model statistics are four numbers per task: lo, hi (two order statistics
of |T|), c (one order statistic of B, which needs lo and hi) and max(B). The statistics passes find them
exactly: radix selection over |T| (2 passes), then over B with its max (2 passes): 4 passes + the merge.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, Streamed, TensorCtx, per_model
from merge_cli.methods.wholemodel import CHUNK, RadixSelect, WholeModelStats, colsum, gathered, step_elements

# Fast kernels (merge_cli/kernels) serving this file's methods, by method name: none, the plain
# kernel below runs on every device and dtype.
FAST_KERNELS: dict[str, tuple[str, ...]] = {}


class PcbParams(MethodParams):
    weight: float = per_model(1.0, description="lambda_i: scale of this model's balanced task vector")
    density: float = Field(0.1, ge=0.0, le=1.0, description="fraction of each task row kept (pcb_ratio r)")
    clamp_quantile: float = Field(
        0.01, ge=0.0, lt=0.5, description="outlier clip quantile q_c of |tau| per task"
    )
    inter: Literal["sum_raw", "pairwise_norm"] = Field("sum_raw", description="inter-balancing form")
    granularity: Literal["model", "tensor"] = Field(
        "model", description="task row = whole model (reference) or tensor"
    )


def clip_ranks(d: int, q: float) -> tuple[int, int]:
    """1-based ascending ranks of lo = sorted[int(d*q)] and hi = sorted[int(d*(1-q)) - 1]."""
    return min(int(d * q), d - 1) + 1, max(int(d * (1 - q)), 1)


def drop_rank(d: int, r: float) -> int:
    """1-based ascending rank of c = sorted(B)[int(d*(1-r))], the index clamped to the row (r = 0)."""
    return min(int(d * (1 - r)), d - 1) + 1


def _col(v, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1, 1)


def _minmax_(x: torch.Tensor, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """In place: x = (x - lo) / span per row, 0 on rows whose span is not > 0 (a constant row)."""
    ok = span > 0
    x.sub_(lo).div_(torch.where(ok, span, torch.ones_like(span)))
    if not bool(ok.all()):
        x.masked_fill_(~ok, 0.0)
    return x


def balance(
    T: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inter: str, clipped: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Steps 1-4 on task rows T [N, n] with per-task bounds [N, 1]: (clipped Tc, balance scores B).
    Tc is None unless `clipped`. T is not modified."""
    n_tasks = T.shape[0]
    A = T.abs()
    torch.maximum(A, lo, out=A)
    torch.minimum(A, hi, out=A)  # A = clip(|T|, lo, hi)
    mm = _minmax_(A.clone() if clipped else A, lo, hi - lo)  # minmax_row(A): min(A) = lo, max(A) = hi
    if inter == "sum_raw":
        s_inter = T * colsum(T)
        s_inter.tanh_()
    else:
        tn = torch.sign(T).mul_(mm)
        s_inter = torch.stack([colsum(torch.tanh(tn[i : i + 1] * tn))[0] for i in range(n_tasks)])
        del tn
    s_intra = mm * n_tasks
    s_intra.mul_(mm).exp_()
    del mm
    B = s_intra.mul_(s_inter).add_(0.0)  # + 0.0: no negative zeros in B
    return (torch.sign(T).mul_(A) if clipped else None), B


def fuse(
    Tc: torch.Tensor, B: torch.Tensor, c: torch.Tensor, bmax: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 5-7: W = minmax(max(B, c)) with min = c and max = bmax; the lambda-weighted W-average of Tc.
    Returns (the merged task vector, W); the inputs are not modified."""
    W = _minmax_(torch.maximum(B, c), c, bmax - c)
    num = colsum(lam * Tc * W)[0]
    return num.div_(colsum(W)[0].clamp_(min=1e-12)), W


def _task_rows(base: torch.Tensor, tensors: list[torch.Tensor], s: int, e: int) -> torch.Tensor:
    b = base.reshape(-1)[s:e]
    return torch.stack([t.reshape(-1)[s:e] - b for t in tensors])


def _tensor_stats(base, tensors, p: ParamSet) -> dict[str, list[float]]:
    """granularity: tensor (non-canonical): the same statistics over this tensor alone."""
    T = torch.stack([t.reshape(-1) - base.reshape(-1) for t in tensors])
    d = T.shape[1]
    r_lo, r_hi = clip_ranks(d, p.clamp_quantile)
    a = T.abs()
    lo = torch.kthvalue(a, r_lo, dim=1, keepdim=True).values
    hi = torch.kthvalue(a, r_hi, dim=1, keepdim=True).values
    del a
    _, B = balance(T, lo, hi, p.inter, clipped=False)
    c = torch.kthvalue(B, drop_rank(d, p.density), dim=1).values
    return {
        "lo": lo.flatten().tolist(),
        "hi": hi.flatten().tolist(),
        "c": c.tolist(),
        "bmax": B.amax(dim=1).tolist(),
    }


def merge_rows(base, tensors, weights, p: ParamSet, st: dict, kept: torch.Tensor) -> torch.Tensor:
    """theta0 + the balanced task vectors over base's elements, given the task statistics `st` (lo, hi, c,
    bmax per task); adds the kept (W > 0) counts per task to `kept`. Elementwise given `st`: any split of a
    tensor into pieces gives the same values."""
    out = base.clone().reshape(-1)
    lo, hi, c, bmax = (_col(st[k], out) for k in ("lo", "hi", "c", "bmax"))
    lam = _col(list(weights), out)
    n = out.numel()
    step = step_elements(len(tensors), out.element_size())
    for s in range(0, n, step):
        e = min(s + step, n)
        T = _task_rows(base, tensors, s, e)
        Tc, B = balance(T, lo, hi, p.inter)
        del T
        merged, W = fuse(Tc, B, c, bmax, lam)
        out[s:e] += merged
        kept += (W > 0).sum(dim=1).cpu().double()
    return out.reshape(base.shape)


def pcb(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    st = ctx.extra if p.granularity == "model" else _tensor_stats(base, tensors, p)
    kept = torch.zeros(len(tensors), dtype=torch.float64)
    out = merge_rows(base, tensors, weights, p, st, kept)
    ctx.stats["kept_fraction"] = [float(k) / max(base.numel(), 1) for k in kept]
    return out


# granularity model, tensors too big to merge whole: the same merge over row chunks (stats from the passes)
MODEL_STREAM = Streamed(
    init=lambda p, ctx, n_models: {"kept": torch.zeros(n_models, dtype=torch.float64), "n": 0},
    apply=lambda state, base, xs, weights, p, ctx: _apply_chunk(state, base, xs, weights, p, ctx),
    finish=lambda state, ctx: ctx.stats.update(
        kept_fraction=[float(k) / max(state["n"], 1) for k in state["kept"]]
    ),
)


def _apply_chunk(state, base, xs, weights, p, ctx) -> torch.Tensor:
    state["n"] += base.numel()
    return merge_rows(base, xs, weights, p, ctx.extra, state["kept"])


class PcbStats(WholeModelStats):
    """lo, hi (clip bounds of |T_i|), c (drop cut of B_i) and max(B_i) per task over the whole model."""

    rounds = ("clip bounds of |tau| (high bits)", "clip bounds of |tau| (low bits)",
              "drop cut of B (high bits)", "drop cut of B (low bits)")  # fmt: skip
    streamed = MODEL_STREAM

    @staticmethod
    def applies(params: ParamSet) -> bool:
        return params.granularity == "model"

    def __init__(self, jobs, n_models, side_dir):
        super().__init__(jobs, n_models, side_dir)
        self.d = sum(j.numel for j in jobs)
        r_lo, r_hi = clip_ranks(self.d, self.params.clamp_quantile)
        self.clip = [RadixSelect([r_lo, r_hi], nonneg=True) for _ in range(n_models)]
        self.cut = [RadixSelect([drop_rank(self.d, self.params.density)]) for _ in range(n_models)]
        self.bmax = [float("-inf")] * n_models
        self.lo: list[float] = []
        self.hi: list[float] = []

    def gather(self, base, tensors, params, ctx) -> None:
        n = base.numel()
        flat_b = base.reshape(-1)
        # rounds 0-1 work on one task row at a time: steps of CHUNK; rounds 2-3 on all N rows at once
        step = CHUNK if self.round < 2 else step_elements(len(tensors), base.element_size())
        for s in range(0, n, step):
            e = min(s + step, n)
            if self.round < 2:
                for t, sel in zip(tensors, self.clip, strict=True):
                    sel.add((t.reshape(-1)[s:e] - flat_b[s:e]).abs_())
                continue
            T = _task_rows(base, tensors, s, e)
            _, B = balance(T, _col(self.lo, T), _col(self.hi, T), self.params.inter, clipped=False)
            del T
            for i, sel in enumerate(self.cut):
                sel.add(B[i])
            if self.round == 2:
                self.bmax = [max(a, b) for a, b in zip(self.bmax, B.amax(dim=1).tolist(), strict=True)]

    def end_round(self) -> bool:
        for sel in self.clip if self.round < 2 else self.cut:
            sel.advance()
        if self.round == 1:
            self.lo = [sel.values[0] for sel in self.clip]
            self.hi = [sel.values[1] for sel in self.clip]
        return super().end_round()

    def extra(self):
        return {"lo": self.lo, "hi": self.hi, "c": [sel.values[0] for sel in self.cut], "bmax": self.bmax}

    def summary(self):
        return {"elements_per_task": self.d, **self.extra()}


def plan_check(params: list[ParamSet], num_layers: int | None) -> str | None:
    whole = [p for p in params if p.granularity == "model"]
    for key in ("density", "clamp_quantile", "inter"):
        if len({getattr(p, key) for p in whole}) > 1:
            return f"granularity: model needs one '{key}' for the whole model, not per layer or module"
    return None


SPEC = MethodSpec(
    name="pcb",
    title="PCB-Merging (parameter competition balancing; whole-model via streamed statistics passes)",
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging, NeurIPS 2024, arXiv:2410.02396",
    params=PcbParams,
    kernel=pcb,
    needs_base=True,
    summary="theta = theta0 + sum_i lambda_i clip(tau_i) W_i / sum_i W_i; "
    "W = minmax(drop(exp(N minmax(|tau|)^2) * tanh(tau * sum_j tau_j)))",
    stats=PcbStats,
    plan_check=plan_check,
    mergekit_defaults={},
    streamed=gathered(pcb),  # granularity tensor; granularity model is merged whole
)
