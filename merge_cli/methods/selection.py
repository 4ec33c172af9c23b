"""Exact top-k selection without a full sort.

`topk_mask(scores, k)` keeps exactly k entries: every entry above the k-th largest value, then entries
equal to it in index order (lowest flat index first). The threshold comes from kthvalue (selection,
O(n)), never from argsort. Deterministic on every device.
"""

from __future__ import annotations

import torch


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat tensor (1 <= k <= numel)."""
    n = scores.numel()
    return torch.kthvalue(scores.reshape(-1), n - k + 1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k largest entries of `scores` (same shape), ties broken by lowest index."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = kth_largest(flat, k)
    above = flat > thr
    need = k - int(above.sum())
    equal = flat == thr
    if need > 0:
        # keep the first `need` entries equal to the threshold, in flat index order
        order = torch.cumsum(equal.to(torch.int64), 0)
        equal = equal & (order <= need)
    else:
        equal = torch.zeros_like(equal)
    return (above | equal).reshape(scores.shape)


def topk_mask_2d(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k mask of each row of a 2-D tensor (same tie rule as topk_mask); 0 <= k."""
    n = rows.shape[1]
    if k <= 0 or rows.numel() == 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(rows, dtype=torch.bool)
    thr = torch.kthvalue(rows, n - k + 1, dim=1, keepdim=True).values
    above = rows > thr
    need = k - above.sum(dim=1, keepdim=True)
    equal = rows == thr
    equal = equal & (torch.cumsum(equal.to(torch.int64), dim=1) <= need)
    return above | equal


def topk_mask_rows(scores: torch.Tensor, frac: float) -> torch.Tensor:
    """Per-row exact top int(frac * row_len) mask (rows = first dim; a 1-D tensor is one row); same tie rule."""
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    return topk_mask_2d(rows, int(frac * rows.shape[1])).reshape(scores.shape)
