"""The TIES family's shared steps (METHODS.md §3): trim by magnitude, elect a sign per coordinate, merge
the entries that agree. ties.py, ties_model.py (whole-model TIES), gta.py (DARE/Breadcrumbs/DELLA with
sign election) and sce.py build on them; their numerics are described in ties.py's docstring."""

from __future__ import annotations

import torch

from merge_cli.methods.selection import topk_mask
from merge_cli.methods.task_arithmetic import weighted_sum


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) largest-magnitude entries."""
    if density >= 1.0:
        return delta
    return delta.mul_(topk_mask(delta.abs(), int(density * delta.numel())))


def trim_sorted(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's magnitude trim (numerics: mergekit): keep the max(1, int(density * n)) first entries of a
    descending torch.argsort of the fp32 magnitudes, so ties at the threshold fall as torch's sort orders
    them (not by index); density <= 0 keeps nothing."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    if density <= 0.0 or n == 0:
        return torch.zeros_like(delta)
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[: max(1, int(density * n))]] = 1
    return delta * mask.reshape(delta.shape)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """+1/-1 per coordinate: the sign of the sum over models (dim 0); an exact 0 counts as +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_merge(
    trimmed: list[torch.Tensor], weights: list[float], sign: torch.Tensor, how: str, stats=None
):
    """Merge the entries whose sign agrees with the elected `sign` (+1/-1 per coordinate).

    mean/sum: sum_i w_i t_i [agree] (divided by sum_i w_i [agree], 0 -> 1, for mean), each sum formed by
    weighted_sum: products in the compute dtype, accumulated in fp32 for bf16/fp16 and rounded once (as
    mergekit's torch.sum over the stacked products; adding model by model in bf16 rounded at every step).
    stats, when given, is a dict accumulating 'kept' counts per model and 'touched'/'conflict' counts (a
    coordinate is touched when some entry is nonzero, in conflict when some entry opposes the election)."""
    agrees = []
    num = torch.zeros_like(trimmed[0]) if how == "max" else None
    best_abs = torch.zeros_like(trimmed[0]) if how == "max" else None
    touched = conflict = None
    for i, (w, t) in enumerate(zip(weights, trimmed)):
        along = t * sign  # > 0 where t agrees with the election, < 0 where it opposes it
        agree = along > 0
        if how == "max":
            contrib = t * agree * w
            better = contrib.abs() > best_abs
            num = torch.where(better, contrib, num)
            best_abs = torch.maximum(best_abs, contrib.abs())
        else:
            agrees.append(agree)
        if stats is not None:
            stats["kept"][i] += int(torch.count_nonzero(t))
            opposes = along < 0
            touched = agree.clone() if touched is None else touched.logical_or_(agree)
            conflict = opposes if conflict is None else conflict.logical_or_(opposes)
    if stats is not None:
        # an opposing entry implies an agreeing one (the election follows the sum), so touched covers it
        stats["touched"] += int(touched.sum())
        stats["conflict"] += int(conflict.sum())
    if how == "max":
        return num
    like = trimmed[0]
    num = weighted_sum((t * a for t, a in zip(trimmed, agrees, strict=True)), weights, like)
    if how == "mean":
        den = weighted_sum((a.to(like.dtype) for a in agrees), weights, like)
        num.div_(
            den.clamp_(min=torch.finfo(den.dtype).tiny)
            if all(w > 0 for w in weights)
            else torch.where(den == 0, 1.0, den)
        )
    return num


def elect(trimmed: list[torch.Tensor], weights, weighted: bool) -> torch.Tensor:
    """+1/-1 per coordinate: the sign of sum_i w_i t_i (of sum_i t_i unless weighted), formed by weighted_sum
    (mergekit's rounding in bf16); an exact 0 counts as +1."""
    total = weighted_sum(trimmed, list(weights) if weighted else [1.0] * len(trimmed), trimmed[0])
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
