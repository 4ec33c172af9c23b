"""Exact top-k selection without sorting the data.

`topk_mask(scores, k)` keeps exactly k entries: every entry above the k-th largest value, then entries
equal to it in flat index order (lowest index first). Deterministic on every device.

The threshold is found by bracketing: a fixed strided sample (no randomness) gives bounds lo <= hi that
contain the k-th largest value with overwhelming probability; one pass counts the entries above hi and
gathers the few candidates in [lo, hi]; selection then runs on the candidates alone. If the bracket
misses, we fall back to a full kthvalue, so the answer is always exact; only the speed depends on luck.

`StreamingTopK` does the same over a tensor visited in chunks (rows of a huge embedding), in two passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SAMPLE = 65536  # sample size for the bracket
SMALL = 1 << 16  # below this many elements a plain kthvalue is as fast


@dataclass(frozen=True)
class Threshold:
    """The k-th largest value `value`, how many entries lie strictly above it, and how many of the
    entries equal to it are kept (the first `take_equal` in flat order)."""

    value: float
    above: int
    take_equal: int
    equal: int

    @property
    def keep_all_equal(self) -> bool:
        return self.take_equal == self.equal


def bracket(sample: torch.Tensor, k: int, n: int) -> tuple[float, float]:
    """Bounds (lo, hi) likely to contain the k-th largest of n values, from a sample of them."""
    s = sample.reshape(-1).float()
    m = s.numel()
    q = k / n
    margin = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 4.0 / m
    hi_i, lo_i = math.floor((q - margin) * m), math.ceil((q + margin) * m)

    # the (j+1)-th largest is the (m-j-1)-th smallest: both from one partial sort (numpy's introselect
    # with two pivots is several times faster than two torch.kthvalue calls; no full sort)
    want = [m - 1 - j for j in (hi_i, lo_i) if 0 <= j < m]
    part = np.partition(s.detach().cpu().numpy(), want) if want else None
    hi = float(part[m - 1 - hi_i]) if hi_i >= 0 else math.inf
    lo = float(part[m - 1 - lo_i]) if lo_i < m else -math.inf
    return lo, hi


def finish_threshold(cands: torch.Tensor, above_hi: int, k: int) -> Threshold | None:
    """The threshold from the values inside a bracket and the count above it; None if the bracket missed."""
    need = k - above_hi
    if need <= 0 or need > cands.numel():
        return None
    value = torch.kthvalue(cands, cands.numel() - need + 1).values
    above = above_hi + int((cands > value).sum())
    equal = int((cands == value).sum())
    return Threshold(float(value), above, k - above, equal)


def _exact(flat: torch.Tensor, k: int) -> Threshold:
    value = torch.kthvalue(flat, flat.numel() - k + 1).values
    above = int((flat > value).sum())
    return Threshold(float(value), above, k - above, int((flat == value).sum()))


def find_threshold(scores: torch.Tensor, k: int) -> Threshold:
    """The exact threshold for the top k of `scores` (1 <= k < numel)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if n <= SMALL:
        return _exact(flat, k)
    lo, hi = bracket(flat[:: max(1, n // SAMPLE)], k, n)
    above_hi = int((flat > hi).sum()) if hi != math.inf else 0
    band = flat >= lo if hi == math.inf else (flat >= lo) & (flat <= hi)
    found = finish_threshold(flat[band], above_hi, k)
    return found if found is not None else _exact(flat, k)


def mask_from_threshold(scores: torch.Tensor, t: Threshold, equal_seen: int = 0) -> torch.Tensor:
    """Boolean keep-mask for `scores` (a whole tensor, or the next chunk in flat order when `equal_seen`
    counts the threshold-equal entries met in earlier chunks)."""
    if t.keep_all_equal:
        return scores >= t.value
    keep = scores > t.value
    quota = t.take_equal - equal_seen
    if quota > 0:
        equal_at = torch.nonzero(scores.reshape(-1) == t.value).squeeze(1)[:quota]
        keep.view(-1)[equal_at] = True
    return keep


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly k largest entries of `scores` (same shape), ties broken by lowest index."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    return mask_from_threshold(scores, find_threshold(scores, k))


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a tensor (1 <= k <= numel)."""
    if k >= scores.numel():
        return scores.min()
    return torch.tensor(find_threshold(scores, k).value, dtype=scores.dtype)


def topk_mask_2d(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k mask of each row of a 2-D tensor (same tie rule as topk_mask), k an explicit count."""
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


class StreamingTopK:
    """Exact top-k threshold of non-negative fp32 values seen in chunks: a radix select on the float bits.

    Non-negative IEEE floats order like their bit patterns, so two histogram passes find the k-th largest
    value exactly with bounded memory: pass 0 counts the high 16 bits (32768 bins), pass 1 counts the low
    16 bits of the values that fall in the bin holding the k-th largest.

        st = StreamingTopK(k, n)
        for chunk in chunks: st.update(chunk)   # pass 0
        st.next_pass()
        for chunk in chunks: st.update(chunk)   # pass 1
        t = st.result()
    """

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.stage = 0
        self.hist = torch.zeros(1 << 15, dtype=torch.int64)
        self.bin = 0
        self.above_bin = 0

    def update(self, chunk: torch.Tensor) -> None:
        bits = chunk.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
        if self.stage == 0:
            self.hist += torch.bincount((bits >> 16).to(torch.int64), minlength=1 << 15).cpu()
        else:
            low = bits[(bits >> 16) == self.bin] & 0xFFFF
            self.hist += torch.bincount(low.to(torch.int64), minlength=1 << 16).cpu()

    @staticmethod
    def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest entry, and how many entries lie in higher bins."""
        from_top = torch.cumsum(hist.flip(0), 0)
        i = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
        above = int(from_top[i - 1]) if i > 0 else 0
        return hist.numel() - 1 - i, above

    def next_pass(self) -> None:
        self.bin, self.above_bin = self._locate(self.hist, self.k)
        self.hist = torch.zeros(1 << 16, dtype=torch.int64)
        self.stage = 1

    def result(self) -> Threshold:
        low, above_low = self._locate(self.hist, self.k - self.above_bin)
        bits = torch.tensor([(self.bin << 16) | low], dtype=torch.int32)
        value = float(bits.view(torch.float32))
        above = self.above_bin + above_low
        equal = int(self.hist[low])
        return Threshold(value, above, self.k - above, equal)
