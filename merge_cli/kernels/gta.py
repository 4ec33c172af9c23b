"""The generalized task arithmetic family on the blocked kernels: dare_linear / dare_ties (counter-hash
draws, L1 rescale) and tensor-level breadcrumbs / breadcrumbs_ties (a magnitude band from two thresholds),
sparsified per model, then a consensus or a sparse sum (route.py)."""

from __future__ import annotations

import math
from typing import Any

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native
from merge_cli.kernels.route import F32, NoKernel, consensus, native_specs, sparse_sum
from merge_cli.kernels.ties import select_thresholds, trims
from merge_cli.methods import ParamSet
from merge_cli.methods.base import counter_uniform, draw_key

GTA_METHODS = ("dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


class Draws:
    """DARE's keep mask of model i as float32 0/1 over a flat range: u < density, with u the tensor's
    counter-hash draws (TensorCtx.uniform's), compared in float32 as the plain kernel does. k0, k1 and
    bound say the same to the native kernels: keep where (hash >> 8) < bound = ceil(density * 2^24)."""

    def __init__(self, ctx, i: int, density: float):
        self.k0, self.k1 = draw_key(ctx.seed, ctx.name, i)
        self.density = float(torch.tensor(density, dtype=torch.float32))
        self.bound = min(1 << 24, math.ceil(self.density * (1 << 24)))

    def __call__(self, g0: int, g1: int) -> torch.Tensor:
        return (counter_uniform(self.k0, self.k1, g0, g1 - g0) < self.density).to(torch.float32)


def gta_applies(method: str, p: ParamSet) -> bool:
    if method.startswith("dare_"):
        return getattr(p, "trim_density", 1.0) >= 1.0  # MergeLM's extra trim runs on the plain kernels
    return method.startswith("breadcrumbs") and p.granularity == "tensor"


def _dare_draws(p: ParamSet, ctx) -> dict[int, Draws]:
    """The keep-mask draws of each model that drops entries (density < 1)."""
    return {i: Draws(ctx, i, float(d)) for i, d in enumerate(p.density) if d < 1.0}


def _dare_l1_sums(base, xs, masks: dict[int, Draws], offset: int = 0, cd=F32) -> list[tuple[float, float]]:
    """Each model's (||tau||_1, ||m * tau||_1) over the piece at flat `offset` (the L1 factor is their ratio)."""
    steps = [[fused.KeepBelow(masks[i])] if i in masks else [] for i in range(len(xs))]
    return l1_sums(base, xs, steps, offset, cd)


def predraw(method: str, p: ParamSet, base, xs, ctx, cd=F32) -> dict[str, Any] | None:
    """What a whole-tensor dare_* merge with `rescale: l1` needs before it can run, made on the reader
    thread ahead of the merge: each model's (||tau||_1, ||m * tau||_1), a pass of its own."""
    if not (method.startswith("dare_") and gta_applies(method, p)) or getattr(p, "rescale", "none") != "l1":
        return None
    try:
        return {"l1": _dare_l1_sums(base, xs, _dare_draws(p, ctx), 0, cd)}
    except NoKernel:  # the merge itself will say so (plain kernels)
        return None


def l1_sums(base, xs, steps, offset: int, cd=F32) -> list[tuple[float, float]]:
    """fused.l1_sums, on the native kernels when they can run it."""
    specs = native_specs(base, xs, steps, torch.float32, cd)
    if specs is None:
        return fused.l1_sums(base, xs, steps, offset)
    return native.l1_sums(base, xs, specs, offset, cd)


def gta_sparsify(
    method: str, p: ParamSet, n: int, m: int, ctx, views, pre: dict[str, Any] | None = None, cd=F32
) -> list[list[fused.Sparsify]]:
    """Each model's sparsify steps for a tensor of n elements seen through views = (samples, chunks,
    region): DARE's seeded drop and rescale (the L1 factor takes one counting pass, unless `pre`, the
    reader's predraw, brings it), or Breadcrumbs' magnitude band (two exact selections per model, in one
    pass). Negative weights flip the task vector for the consensus (gta.combine's sign(w_i) tau_i with
    weight |w_i|)."""
    from merge_cli.methods.breadcrumbs import band_counts
    from merge_cli.methods.gta import l1_factor

    steps: list[list[fused.Sparsify]] = [[] for _ in range(m)]
    if method.startswith("dare_"):
        how = getattr(p, "rescale", "none")
        masks = _dare_draws(p, ctx)
        for i, mk in masks.items():
            d = float(p.density[i])
            steps[i] = [fused.KeepBelow(mk, div=d if how == "inv_p" and d > 0 else None)]
        if how == "l1":
            sums = (pre or {}).get("l1")
            if sums is None:
                sums = [[0.0, 0.0] for _ in range(m)]
                for offset, b, xs in views[1]():
                    for i, (a, c) in enumerate(_dare_l1_sums(b, xs, masks, offset, cd)):
                        sums[i][0] += a
                        sums[i][1] += c
            for i, mk in masks.items():
                factor = l1_factor(*sums[i])
                if factor is not None:
                    steps[i] = [fused.KeepBelow(mk, mul=factor)]
    else:
        ks: list[int | None] = []
        which: list[int] = []
        for i in range(m):
            if p.density[i] < 1.0:
                k_hi, k_top = band_counts(n, p.density[i], p.gamma[i])
                ks += [k_hi if k_hi < n else None, k_top]
                which += [i, i]
        ts, cuts = select_thresholds(n, ks, *views, which=which, cd=cd)
        j = 0
        for i in range(m):
            if p.density[i] < 1.0:
                hi, top = (trims(ts[j : j + 2], cuts[j : j + 2]) + [[]])[:2]
                steps[i] = [fused.Band(*(x[0] if x else None for x in (hi, top)))]
                j += 2
    return steps


def run_gta(method: str, base, xs, weights, p: ParamSet, out_dtype, steps, offset: int = 0, cd=F32):
    """(output, kept per model, touched, conflict, NaN/Inf counts, squared norms) of a GTA-family chunk
    (della's too: kernels/della.py): sign election and disjoint merge for *_ties and della, else the sum."""
    w = [float(x) for x in weights]
    if method.endswith("_ties") or method == "della":
        flipped = [s + [fused.negate] if wi < 0 else s for s, wi in zip(steps, w)]
        return consensus(
            base,
            xs,
            flipped,
            offset,
            [abs(x) for x in w],
            float(p.lambda_),
            True,
            bool(p.normalize),
            out_dtype,
            cd,
        )
    tot = sum(w)
    divisor = (tot if abs(tot) >= 1e-8 else 1.0) if p.normalize else 1.0
    out, kept, bad, sq = sparse_sum(base, xs, steps, offset, w, float(p.lambda_), divisor, out_dtype, cd)
    return out, kept, None, None, bad, sq
