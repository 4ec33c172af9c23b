"""Model Stock (METHODS.md §8): interpolate between the base and the average of K >= 2 fine-tunes.

    c = mean over pairs i < j of cos(tau_i, tau_j)          (mergekit; or cos(mean pairwise angle), `angle_mean`)
    t = K c / (1 + (K - 1) c)
    theta = t * mean_i(theta_i) + (1 - t) * theta0

Per tensor, or per row with `filter_wise` (rows = shape[0]; a 1-D tensor is one row). The norm product is
clamped to >= 1e-6 (zero task vectors give c = 0, t = 0: the base). c is clamped to [0, 1] by default
(`clamp_cos`), so t stays in [0, 1] and the result on the segment theta0 - mean(theta_i); with
`clamp_cos: false` (mergekit) c lies in [-1, 1] and a denominator |1 + (K-1)c| < 1e-6 gives t = 0.
Model weights are not used.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_cli.methods.base import MethodParams, MethodSpec, ParamSet, TensorCtx


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one t per row instead of per tensor")
    angle_mean: bool = Field(
        False, description="average the pairwise angles, then take the cosine (fusion_bench)"
    )
    clamp_cos: bool = Field(True, description="clamp the mean cosine to [0, 1] (false: [-1, 1] as mergekit)")


def interpolation_ratio(
    deltas: torch.Tensor, angle_mean: bool, clamp_cos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """deltas: [K, R, n] (R rows). Returns (t, c), each of shape [R]."""
    k = deltas.shape[0]
    norms = torch.linalg.vector_norm(deltas, dim=2)  # [K, R]
    acc = torch.zeros(deltas.shape[1], dtype=deltas.dtype, device=deltas.device)
    pairs = 0
    for i in range(k):
        for j in range(i + 1, k):
            cos = (deltas[i] * deltas[j]).sum(dim=1) / (norms[i] * norms[j]).clamp_min(1e-6)
            cos = cos.clamp(-1.0, 1.0)
            acc = acc + (torch.arccos(cos) if angle_mean else cos)
            pairs += 1
    c = acc / pairs
    if angle_mean:
        c = torch.cos(c)
    if clamp_cos:
        c = c.clamp(0.0, 1.0)
    den = 1 + (k - 1) * c
    t = torch.where(
        den.abs() < 1e-6,
        torch.zeros_like(c),
        k * c / torch.where(den.abs() < 1e-6, torch.ones_like(den), den),
    )
    return t, c


def model_stock(base, tensors, weights, p: ParamSet, ctx: TensorCtx) -> torch.Tensor:
    stacked = torch.stack([t - base for t in tensors])
    shape = base.shape
    if p.filter_wise and base.dim() >= 2:
        rows = stacked.reshape(len(tensors), shape[0], -1)
    else:
        rows = stacked.reshape(len(tensors), 1, -1)
    t, c = interpolation_ratio(rows, p.angle_mean, p.clamp_cos)
    mean = torch.stack(tensors).mean(dim=0)
    tt = (
        t.reshape(-1, 1).expand(rows.shape[1], rows.shape[2]).reshape(shape)
        if rows.shape[1] > 1
        else t.reshape(())
    )
    ctx.stats["t"] = float(t.mean())
    ctx.stats["cos"] = float(c.mean())
    return tt * mean + (1 - tt) * base


SPEC = MethodSpec(
    name="model_stock",
    title="Model Stock (base-to-average interpolation from task-vector angles)",
    paper="Jang, Yun, Han 2024, Model Stock: All we need is just a few fine-tuned models, ECCV 2024, arXiv:2403.19522",
    params=ModelStockParams,
    kernel=model_stock,
    needs_base=True,
    min_models=2,
    summary="theta = t mean_i(theta_i) + (1 - t) theta0,  t = K cos / (1 + (K - 1) cos),  cos = mean pairwise cos(tau_i, tau_j)",
    mergekit_defaults={"clamp_cos": False},
)
