"""The per-model sparsify steps the native-kernel tests feed to the kernels (test_native, test_native_half)."""

from __future__ import annotations

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels.gta import Draws
from merge_cli.kernels.ties import select_thresholds, ties_thresholds, trims, whole_views


def sparsify_steps(kind: str, base, xs, ctx, cd=torch.float32, dare_density: float = 0.5):
    """Steps for three models: none, TIES trims, Breadcrumbs bands (thresholds of six top-k counts), or DARE
    keep masks (ctx: an object with the seed and tensor name the draws are keyed by)."""
    n = base.numel()
    if kind == "none":
        return [[] for _ in xs]
    if kind == "trim":
        return trims(*ties_thresholds(base, xs, [0.3, 0.55, 1.0], cd))
    if kind == "band":
        ks = [int(0.9 * n), int(0.01 * n), int(0.5 * n), 0, None, int(0.2 * n)]
        ts, cuts = select_thresholds(n, ks, *whole_views(base, xs, cd), which=[0, 0, 1, 1, 2, 2], cd=cd)
        tr = trims(ts, cuts)
        return [[fused.Band(tr[2 * i][0] if tr[2 * i] else None, tr[2 * i + 1][0] if tr[2 * i + 1] else None)]
                for i in range(3)]  # fmt: skip
    if kind == "dare":
        return [
            [fused.KeepBelow(Draws(ctx, 0, 0.3), mul=2.7)],
            [fused.KeepBelow(Draws(ctx, 1, dare_density), div=dare_density), fused.negate],
            [fused.KeepBelow(Draws(ctx, 2, 0.0))],
        ]
    raise AssertionError(kind)
