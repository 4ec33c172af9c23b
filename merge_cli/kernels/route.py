"""Native or eager for one blocked primitive, and which compute dtypes the fast kernels serve.

fp32 runs on the native kernels, or the eager ones of blocked.py without a compiler; bf16/fp16 run on the
native kernels only (they round every op as torch does in that dtype), else NoKernel sends the tensor to
the plain kernels; except the methods of ANY_DTYPE, whose fast kernels are torch ops in the compute dtype.
`cd` is the compute dtype everywhere in kernels/.
"""

from __future__ import annotations

import torch

from merge_cli.kernels import blocked as fused
from merge_cli.kernels import native

F32 = torch.float32
# methods whose fast kernels are eager torch in the compute dtype itself (any dtype, no compiler needed)
ANY_DTYPE = ("linear", "slerp", "nuslerp", "model_stock")
NATIVE_ONLY = ("sce", "della", "della_linear")  # no eager blocked form: fp32 needs the native kernels too
# methods whose fast kernels reduce with torch as the plain ones do (sce: its weights): torch's reduction
# order depends on the thread count, so merges with them keep the plain kernels' threads
TORCH_REDUCTIONS = ("slerp", "nuslerp", "model_stock", "sce")


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_name(dt: torch.dtype) -> str:
    return _NAMES.get(dt, str(dt).removeprefix("torch."))


def fast_path(methods, cd: torch.dtype) -> str | None:
    """None when the fast kernels can merge these methods in compute dtype cd; otherwise why not (a
    phrase). Resolving the native kernels may wait for their build (native.warm_up started it)."""
    if all(m in ANY_DTYPE for m in methods):
        return None
    native_only = [m for m in methods if m in NATIVE_ONLY]
    if cd == torch.float32 and not native_only:
        return None
    if native.lib() is None:
        if native_only:  # in every dtype: say the method, not the dtype
            return f"{native_only[0]} needs the native kernels ({native.unavailable_reason()})"
        return f"{dtype_name(cd)} compute needs the native kernels ({native.unavailable_reason()})"
    if not native.dtype_ok(cd):
        return f"{dtype_name(cd)} compute has no native path (the C compiler has no _Float16)"
    return None


class NoKernel(Exception):
    """A half-dtype merge the native kernels cannot take (an input dtype they do not read): the caller
    merges the tensor with the plain kernels."""


def native_specs(base, xs, steps, out_dtype, cd=F32) -> list[native.Spec] | None:
    """The native kernels' per-model specs for these steps, or None when they cannot run them (no
    compiler, or dtypes they do not take): the eager kernels of kernels/blocked.py run instead (fp32 compute;
    in bf16/fp16, NoKernel: the plain kernels)."""
    ok = native.lib() is not None and native.supports(base, *xs) and native.dtype_ok(out_dtype)
    specs = [native.spec(s) for s in steps] if ok and native.dtype_ok(cd) else [None]
    if any(s is None for s in specs):
        if cd != F32:
            raise NoKernel
        return None
    return specs


def consensus(base, xs, steps, offset, w, lam, weighted, mean, out_dtype, cd=F32):
    """fused.consensus, on the native kernels when they can run it (bitwise the same result)."""
    specs = native_specs(base, xs, steps, out_dtype, cd)
    if specs is None:
        return fused.consensus(base, xs, steps, offset, w, lam, weighted, mean, out_dtype)
    return native.merge(base, xs, specs, w, lam, True, weighted, mean, 1.0, out_dtype, offset, cd)


def sparse_sum(base, xs, steps, offset, w, lam, divisor, out_dtype, cd=F32):
    """fused.sparse_sum, on the native kernels when they can run it: (output, kept, NaN/Inf counts, norms)."""
    specs = native_specs(base, xs, steps, out_dtype, cd)
    if specs is None:
        return fused.sparse_sum(base, xs, steps, offset, w, lam, divisor, out_dtype)
    out, kept, _, _, bad, sq = native.merge(
        base, xs, specs, w, lam, False, False, False, divisor, out_dtype, offset, cd
    )
    return out, kept, bad, sq
