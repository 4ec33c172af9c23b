"""Building blocks of whole-model methods: the WholeModelStats base class and exact streamed selection.

`RadixSelect` gives exact order statistics (the k-th smallest value of a task vector over the whole model)
in two passes with 2 x 65536 counters per requested rank: pass one histograms the high 16 bits of a
monotone integer key of each fp32 value, pass two the low 16 bits of the values in the chosen bucket.
No value is kept, so memory does not grow with the model. `ExactSum` sums non-negative fp32 values
exactly (one correctly rounded result, whatever the order or the split into pieces). The driver is
merge_cli/engine/stats.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merge_cli.methods.base import ParamSet, Streamed, TensorCtx

if TYPE_CHECKING:
    from merge_cli.plan import TensorJob

CHUNK = 1 << 22  # values per histogram step: bounds the temporaries; smaller pieces are buffered

_BINS = 1 << 16


def colsum(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... in that order (16-bit rows accumulated in fp32, rounded once), keepdim.

    The same values as torch's rows.sum(dim=0) on its vectorised path, but never dependent on the row
    width: torch reduces the last (width mod vector length) columns differently when there are 5 or more
    rows, so a sum over a chunk could differ from the same columns summed within a wider chunk."""
    acc_dtype = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    acc = rows[0].to(acc_dtype, copy=True)
    for r in rows[1:]:
        acc += r
    return acc.to(rows.dtype).unsqueeze(0)


def step_elements(n_rows: int, itemsize: int) -> int:
    """Columns per step of an [n_rows, step] computation so each temporary stays near 16 MB: under glibc's
    mmap threshold (32 MiB, engine._return_freed_memory), temporaries come from the heap and are reused,
    instead of being mapped and page-faulted in afresh on every step (a multiple of 64)."""
    return max(1 << 16, ((16 << 20) // (max(n_rows, 1) * itemsize)) // 64 * 64)


def float_keys(x: torch.Tensor, nonneg: bool = False) -> torch.Tensor:
    """int32 keys whose signed order is the order of the fp32 values. Non-negative floats are their own
    keys; negative ones get their magnitude bits flipped. (-0.0 sorts just below +0.0; as floats they are
    equal, so a selected -0.0 compares like 0.0.)"""
    b = x.reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    return b if nonneg else b ^ ((b >> 31) & 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    k = torch.tensor([key], dtype=torch.int32)
    return float((k ^ ((k >> 31) & 0x7FFFFFFF)).view(torch.float32))


class RadixSelect:
    """Exact k-th smallest values (1-based ranks) of one stream of fp32 values, over two passes.

    Call `add(values)` for every piece of the stream in pass 0, `advance()`, the same again in pass 1,
    `advance()`; then `values` holds one float per requested rank. `count` is the stream length.
    """

    def __init__(self, ranks: list[int], nonneg: bool = False):
        self.ranks = list(ranks)
        self.nonneg = nonneg  # every value >= 0 (e.g. magnitudes): cheaper keys
        self.phase = 0
        self.count = 0
        self.high = torch.zeros(_BINS, dtype=torch.int64)
        self.buckets: list[int] = []
        self.within: list[int] = []
        self.low: dict[int, torch.Tensor] = {}
        self.values: list[float] = []
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0

    def add(self, x: torch.Tensor) -> None:
        """Count the values of x (small pieces are buffered and counted together: do not modify x after)."""
        self._pending.append(x.reshape(-1))
        self._pending_n += x.numel()
        if self._pending_n >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        flat = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_n = [], 0
        for s in range(0, flat.numel(), CHUNK):
            k = float_keys(flat[s : s + CHUNK], self.nonneg)
            hi = (k >> 16) + (_BINS // 2)
            if self.phase == 0:
                self.count += k.numel()
                self.high += torch.bincount(hi, minlength=_BINS).cpu()
            else:
                for b, hist in self.low.items():
                    sel = k[hi == b] & 0xFFFF
                    if sel.numel():
                        hist += torch.bincount(sel, minlength=_BINS).cpu()

    def advance(self) -> None:
        self._flush()
        if self.phase == 0:
            cum = torch.cumsum(self.high, 0)
            for r in self.ranks:
                if not 1 <= r <= self.count:
                    raise ValueError(f"rank {r} outside 1..{self.count}")
                b = int(torch.searchsorted(cum, torch.tensor([r]), right=False))
                self.buckets.append(b)
                self.within.append(r - (int(cum[b - 1]) if b > 0 else 0))
                self.low.setdefault(b, torch.zeros(_BINS, dtype=torch.int64))
        elif self.phase == 1:
            for b, w in zip(self.buckets, self.within, strict=True):
                cum = torch.cumsum(self.low[b], 0)
                low = int(torch.searchsorted(cum, torch.tensor([w]), right=False))
                self.values.append(key_to_float(((b - _BINS // 2) << 16) | low))
            self.low.clear()
        self.phase += 1


class ExactSum:
    """The exact sum of a stream of non-negative float values, rounded once (to a Python float) at the end.

    Each value is an integer significand m times a power of two (fp32: m < 2^24; fp64: m < 2^53, split in
    two halves below 2^27). Per binary exponent the significands are summed in float64, which is exact
    (pieces of at most 2^26 values keep every partial sum an integer below 2^53); the per-exponent sums are
    then combined as Python integers. So the result does not depend on how the stream is split into pieces,
    nor on their order. Inf / NaN values make it inf / NaN. 16-bit values are summed as their fp32 values.
    """

    _SCALE = 1074  # the total is kept as sum * 2^1074 (the smallest fp64 subnormal is 2^-1074): an integer

    def __init__(self):
        self.total = 0
        self.special = 0.0  # the sum of inf / nan values (0.0 if none)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        if flat.dtype != torch.float64:
            flat = flat.to(torch.float32)
        for s in range(0, flat.numel(), 1 << 26):
            self._add(flat[s : s + (1 << 26)].contiguous())

    def _add(self, x: torch.Tensor) -> None:
        if x.dtype == torch.float64:
            bits, mbits, top, shift = x.view(torch.int64), 52, 2047, self._SCALE - 1075
        else:
            bits, mbits, top, shift = x.view(torch.int32), 23, 255, self._SCALE - 150
        e = (bits >> mbits).long()  # the biased exponent (the sign bit is 0: non-negative values)
        m = bits & ((1 << mbits) - 1)
        m = torch.where(e > 0, m | (1 << mbits), m)  # the implicit leading bit of normal numbers
        if bool((e == top).any()):
            self.special += float(x[e == top].double().sum())
            m = torch.where(e == top, 0, m)
        halves = [(m >> 26, 26), (m & ((1 << 26) - 1), 0)] if x.dtype == torch.float64 else [(m, 0)]
        for part, lshift in halves:
            sums = torch.bincount(e, weights=part.double(), minlength=top + 1).cpu().tolist()
            for exp, v in enumerate(sums[:top]):
                if v:
                    self.total += int(v) << (max(exp, 1) + shift + lshift)

    @property
    def value(self) -> float:
        return self.total / (1 << self._SCALE) + self.special


class WholeModelStats:
    """Base class of a method's whole-model statistics. One instance per merge, over the jobs it applies to.

    Subclasses set `rounds` (labels of the passes, for progress and report) and implement `gather`, `extra`
    (the dict kernels get as ctx.extra) and `summary` (plain numbers for the report). In every round the
    driver streams each applicable job as consecutive flat pieces, in order: `gather` gets one piece of each
    model (1-D, in the compute dtype on the device; ctx.offset is the piece's first flat index, ctx.shape the
    whole tensor's shape), then `end_tensor` closes the tensor. Pieces are bounded by the memory budget, so
    a statistic must come out the same whatever the split (counts, histograms, maxima, exact sums).

    `streamed`, when set, is the row-chunked form of the merge pass of these jobs (the engine uses it for
    tensors too big to merge whole); elementwise methods need none.
    """

    rounds: tuple[str, ...] = ()
    streamed: Streamed | None = None

    def __init__(self, jobs: list[TensorJob], n_models: int, side_dir: Path | None):
        self.jobs = jobs
        self.n_models = n_models
        self.side_dir = side_dir
        self.round = 0
        self.params = job_params(jobs[0])

    @staticmethod
    def applies(params: ParamSet) -> bool:
        return True

    @classmethod
    def rounds_for(cls, params: ParamSet) -> tuple[str, ...]:
        """The passes a merge with these (whole-model) parameters runs, for the plan's notes."""
        return cls.rounds

    def gather(
        self, base: torch.Tensor | None, tensors: list[torch.Tensor], params: ParamSet, ctx: TensorCtx
    ) -> None:
        raise NotImplementedError

    def end_tensor(self, ctx: TensorCtx) -> None:
        """After the last piece of a tensor (ctx as for its pieces)."""

    def end_round(self) -> bool:
        """Close the current round; True when another is needed."""
        self.round += 1
        return self.round < len(self.rounds)

    def extra(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


def job_params(job: TensorJob) -> ParamSet:
    return ParamSet({k: (tuple(v) if isinstance(v, list) else v) for k, v in job.params.items()})


def gathered(kernel) -> Streamed:
    """A Streamed form for kernels that need the whole tensor at once (an SVD, per-tensor quantiles): one
    pass copies the row chunks into whole tensors (allocated once), then apply runs the kernel once on the
    whole tensors and returns each chunk's part of the output. It meets the engine's row-chunk contract
    with the same result as the whole path; it holds the whole tensors, so it saves little memory. The
    kernel gets the only references to them, so it can let each input go once it has used it."""

    def init(p, ctx, n_models):
        return {"b": None, "xs": [None] * n_models, "out": None, "stats": {}}

    def _put(whole, chunk, ctx):
        if whole is None:
            whole = torch.empty(ctx.shape, dtype=chunk.dtype, device=chunk.device)
        whole.reshape(-1)[ctx.offset : ctx.offset + chunk.numel()] = chunk.reshape(-1)
        return whole

    def gather(state, pass_index, base, xs, p, ctx):
        if base is not None:
            state["b"] = _put(state["b"], base, ctx)
        state["xs"] = [_put(acc, x, ctx) for acc, x in zip(state["xs"], xs, strict=True)]

    def apply(state, base, xs, weights, p, ctx):
        if state["out"] is None:
            whole = TensorCtx(name=ctx.name, layer=ctx.layer, group=ctx.group, seed=ctx.seed, device=ctx.device,
                              num_layers=ctx.num_layers, extra=ctx.extra, shape=ctx.shape,
                              owns_inputs=True)  # fmt: skip
            state["out"] = kernel(state.pop("b"), state.pop("xs"), weights, p, whole).reshape(-1)
            state["stats"] = whole.stats
        return state["out"][ctx.offset : ctx.offset + base.numel()].reshape(base.shape)

    def finish(state, ctx):
        ctx.stats.update(state["stats"])

    return Streamed(
        init=init, apply=apply, passes=1, gather=gather, end_pass=lambda state, p: None, finish=finish
    )
