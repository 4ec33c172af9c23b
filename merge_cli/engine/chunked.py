"""Tensors whose working set exceeds the memory budget (embeddings, lm_head) merged in row chunks:
elementwise methods chunk as they are, others through their Streamed form (statistics passes over the
chunks, then apply); the blocked kernels find whole-tensor thresholds in passes over the chunks first."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.engine.jobs import _ctx, _params
from merge_cli.engine.stats import whole_model_job, whole_model_streamed
from merge_cli.errors import MergeCliError
from merge_cli.finite import ensure_finite
from merge_cli.kernels.blocked import NonFinite
from merge_cli.kernels.choice import dtype_name
from merge_cli.kernels.interp import INTERP_METHODS, KEEP, release
from merge_cli.methods import METHODS, ParamSet
from merge_cli.methods.selection import SAMPLE
from merge_cli.plan import TensorJob, report_params


class ChunkedPath:
    """The row-chunked half of the engine's _Compute (compute.py): it uses _Compute's plan, device, prep,
    to_host and check_counts."""

    def interp_chunk_apply(self, job: TensorJob, rows: int, state, params: ParamSet, ctx):
        """slerp, nuslerp, model_stock: their Streamed gather pass, run here on the fast kernels, then the fast
        apply. A chunk whose sums are not finite (or where the gather reduces nothing) gets the exact NaN/Inf
        check, which names the model, tensor and rows as the plain pass does."""
        from merge_cli.kernels.dispatch import interp_chunked

        gather, apply = interp_chunked(job.method, params, self.dtype)
        for offset, b, xs in self.chunks(job, rows, raw=True, check=False):
            if not gather(state, b, xs):
                self.check_counts(job, [1] * (len(xs) + (b is not None)), offset, b, xs)
        self.log.ran_fast()
        weights, out_dtype = list(job.weights), ST_TO_TORCH[job.out_dtype]
        return lambda offset, b, xs: apply(state, b, xs, weights, out_dtype, ctx)

    def fused_chunk_apply(
        self, job: TensorJob, rows: int, state, params: ParamSet, weights, out_dtype, ctx=None
    ):  # fmt: skip
        """A per-chunk blocked apply (offset, base, xs) -> (out, squared task-vector norms or None), or None
        when the blocked kernels do not apply. For ties, dare_* and breadcrumbs*, what needs the whole
        tensor (exact thresholds and tie cutoffs, L1 factors) is found first, in passes over the chunks."""
        from merge_cli.kernels import native
        from merge_cli.kernels.blocked import abs_tau
        from merge_cli.kernels.della import DELLA_METHODS, chunk_factors, run_della
        from merge_cli.kernels.dispatch import whole
        from merge_cli.kernels.gta import gta_sparsify, run_gta
        from merge_cli.kernels.route import NATIVE_ONLY
        from merge_cli.kernels.ties import counts_for, run_ties, select_thresholds, trims

        if not self.fused:
            return None
        why = self.why_plain(job, params)
        if why is not None:
            self.ran_plain(why)
            return None
        cd = self.dtype
        models = self.plan.models
        if job.method in INTERP_METHODS:
            return self.interp_chunk_apply(job, rows, state, params, ctx)
        native_only = cd != torch.float32 or job.method in NATIVE_ONLY
        if native_only and job.method != "linear":  # the native kernels must read every input
            refs = ([job.base] if job.base else []) + list(job.inputs)
            if not native.supports(*(models[r.model].checkpoint.read_rows(r.name, 0, 1) for r in refs)):
                self.ran_plain(f"{dtype_name(cd)} compute of inputs the native kernels do not read")
                return None
        if job.method in ("linear", "task_arithmetic"):
            self.log.ran_fast()

            def elementwise(offset, b, xs):
                st: dict[str, Any] = {}
                out = whole(job.method, b, xs, weights, params, out_dtype, st, cd=cd)
                self.check_counts(job, st.get("_nonfinite"), offset, b, xs)
                return out, st.get("_sqnorms")

            return elementwise
        if job.method == "sce":
            return self._sce_apply(job, rows, state, params, out_dtype)
        per_row = job.numel // job.shape[0]

        def read(ref, r0: int, r1: int) -> torch.Tensor:
            return models[ref.model].checkpoint.read_rows(ref.name, r0, r1).reshape(-1)

        @functools.cache  # breadcrumbs brackets two thresholds per model from one sample
        def samples(i: int) -> torch.Tensor:  # whole rows at a fixed stride, about SAMPLE entries
            picked = range(0, job.shape[0], max(1, job.shape[0] // max(1, SAMPLE // per_row)))
            b = torch.cat([read(job.base, r, r + 1) for r in picked])
            x = torch.cat([read(job.inputs[i], r, r + 1) for r in picked])
            return abs_tau(x, b, cd)

        def region(i: int, g0: int, g1: int):
            r0, r1 = g0 // per_row, -(-g1 // per_row)
            lo, hi = g0 - r0 * per_row, g1 - r0 * per_row
            return read(job.base, r0, r1)[lo:hi], read(job.inputs[i], r0, r1)[lo:hi]

        views = (samples, lambda: self.chunks(job, rows, raw=True, check=False), region)
        ctx = _ctx(self.plan, job, self.device)
        try:
            if job.method == "ties":
                ks = counts_for(job.numel, params.density)
                steps = trims(*select_thresholds(job.numel, ks, *views, cd=cd))
            elif job.method in DELLA_METHODS:  # ranks per chunk (rows are whole); L1 factors in a pass
                steps = chunk_factors(params, views[1], ctx, cd)
            else:
                steps = gta_sparsify(job.method, params, job.numel, len(job.inputs), ctx, views, cd=cd)
        except NonFinite:  # a NaN/Inf input reached a count
            if self.check_finite:
                for _ in self.chunks(job, rows, raw=True):  # names the model, tensor and rows, and raises
                    pass
            self.ran_plain("NaN/Inf inputs (--allow-nonfinite)")
            return None  # --allow-nonfinite: the plain streamed kernels merge it
        self.log.ran_fast()

        def apply(offset, b, xs):
            try:
                if job.method == "ties":
                    res = run_ties(b, xs, weights, params, out_dtype, steps, offset, cd)
                elif job.method in DELLA_METHODS:
                    res = run_della(job.method, b, xs, weights, params, out_dtype, ctx, offset, cd, steps)
                else:
                    res = run_gta(job.method, b, xs, weights, params, out_dtype, steps, offset, cd)
            except NonFinite:  # Infs that cancel in the election: name the rows, or stop clearly
                self.check_counts(job, [1] * (len(xs) + 1), offset, b, xs)
                raise MergeCliError(
                    f"tensor '{job.name}': NaN/Inf values met in the merge; run again with --fused off"
                ) from None
            out, kept, touched, conflict, bad, sq = res
            self.check_counts(job, bad, offset, b, xs)
            st = state["stats"]
            st["numel"] = job.numel
            for i, k in enumerate(kept):
                st["kept"][i] += k
            if touched is not None:
                st["touched"] += touched
                st["conflict"] += conflict
            return out, sq

        return apply

    def _sce_apply(self, job: TensorJob, rows: int, state, params: ParamSet, out_dtype):
        """sce's per-chunk native apply after its statistics passes (kernels/sce.py SceChunks)."""
        from merge_cli.kernels import native
        from merge_cli.kernels.route import NoKernel
        from merge_cli.kernels.sce import SceChunks, too_many

        why = too_many(len(job.inputs))
        if why or not native.dtype_ok(out_dtype):
            self.ran_plain(why or f"output dtype {out_dtype} the native kernels do not write")
            return None
        sce = SceChunks(state, params, self.dtype)
        try:
            sce.prepare(lambda: self.chunks(job, rows, raw=True, check=False))
        except NonFinite:  # a NaN/Inf input: name it, or (--allow-nonfinite) the plain streamed kernels
            if self.check_finite:
                for _ in self.chunks(job, rows, raw=True):
                    pass
            self.ran_plain("NaN/Inf inputs (--allow-nonfinite)")
            return None
        except NoKernel:
            self.ran_plain(f"{dtype_name(self.dtype)} compute of inputs the native kernels do not read")
            return None
        self.log.ran_fast()

        def apply(offset, b, xs):
            try:
                out, bad, sq = sce.apply(b, xs, out_dtype)
            except NonFinite:
                self.check_counts(job, [1] * (len(xs) + 1), offset, b, xs)
                raise MergeCliError(
                    f"tensor '{job.name}': NaN/Inf values met in the merge; run again with --fused off"
                ) from None
            self.check_counts(job, bad, offset, b, xs)
            return out, sq

        return apply

    def chunks(
        self, job: TensorJob, rows: int, raw: bool = False, check: bool = True
    ) -> Iterator[tuple[int, torch.Tensor | None, list[torch.Tensor]]]:
        """(flat offset, base chunk, input chunks) on the device (in the compute dtype unless raw), in row order."""
        models = self.plan.models
        per_row = job.numel // job.shape[0]
        for r0 in range(0, job.shape[0], rows):
            r1 = min(r0 + rows, job.shape[0])

            def read(ref, r0=r0, r1=r1):
                t = models[ref.model].checkpoint.read_rows(ref.name, r0, r1)
                if check and self.check_finite:  # issue 6: NaN/Inf in a source stops the merge (first pass)
                    ensure_finite(self.plan, ref, t, rows=(r0, r1))
                return t.to(self.device, non_blocking=True) if raw else self.prep(t)

            yield r0 * per_row, (read(job.base) if job.base else None), [read(i) for i in job.inputs]

    def chunked(self, job: TensorJob, rows: int, emit: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        """Merge a huge tensor in row chunks, handing each output chunk to emit()."""
        spec = METHODS[job.method]
        out_dtype = ST_TO_TORCH[job.out_dtype]
        params, weights = _params(job), list(job.weights)
        ctx = _ctx(self.plan, job, self.device)
        stats: dict[str, Any] = {
            "name": job.name,
            "method": job.method,
            "params": report_params(job),
            "chunked": True,
        }
        st = whole_model_streamed(job) if whole_model_job(job) else spec.streamed
        state = st.init(params, ctx, len(job.inputs)) if st else None
        fused_apply = self.fused_chunk_apply(job, rows, state, params, weights, out_dtype, ctx)
        passes = st.passes if st and fused_apply is None else 0
        for p in range(passes):
            for offset, b, xs in self.chunks(job, rows, check=p == 0):
                ctx.offset = offset
                st.gather(state, p, b, xs, params, ctx)
            st.end_pass(state, p)
        sq = [0.0] * len(job.inputs)
        first = not passes  # the first pass over the rows checks them for NaN/Inf
        # the fused kernels count NaN/Inf in the same loop, so their rows need no separate check
        for offset, b, xs in self.chunks(
            job, rows, raw=fused_apply is not None, check=first and fused_apply is None
        ):
            ctx.offset = offset
            if fused_apply is not None:
                out, chunk_sq = fused_apply(offset, b, xs)  # task-vector norms come from the same loop
                for i, v in enumerate(chunk_sq or ()):
                    sq[i] += v
            else:
                out = (
                    st.apply(state, b, xs, weights, params, ctx)
                    if st
                    else spec.kernel(b, xs, weights, params, ctx)
                )
                if b is not None:
                    for i, x in enumerate(xs):
                        sq[i] += float(torch.linalg.vector_norm(x - b, dtype=torch.float64)) ** 2
            emit(self.to_host(out, out_dtype))
        if fused_apply is not None and job.method in INTERP_METHODS:
            release(KEEP)  # chunk-sized scratch buffers of the interpolation kernels
        if job.base is not None:
            stats["task_vector_norms"] = [math.sqrt(s) for s in sq]
        if st and st.finish:
            st.finish(state, ctx)
        stats.update(ctx.stats)
        return stats
