"""della / della_linear on the native kernels (kernels/della.py): bitwise the plain kernel of methods/della.py
in every compute dtype, whole tensors and row chunks, both rescales, epsilon 0 and > 0, 1-D / 2-D / 3-D
tensors with tied magnitudes; and a mergekit-format recipe run end to end against --fused off."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
from helpers import merge_in_process, write_model, write_recipe
from method_helpers import params_for

from merge_cli.kernels import della, native
from merge_cli.kernels.della import chunk_factors, run_della
from merge_cli.methods import METHODS, TensorCtx

pytestmark = pytest.mark.skipif(
    native.lib() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
DTYPES = [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not native.has_f16(), reason="the C compiler has no _Float16"))]  # fmt: skip
SHAPES = {"1d": (2500,), "2d": (24, 150), "3d": (10, 6, 35)}
NAME = "model.layers.3.mlp.down_proj.weight"


def _inputs(shape, seed=0):
    """bf16 base and three experts: quantised deltas (many equal magnitudes), a quarter of them zero."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = []
    for i in range(3):
        step = 2.0**-6 * torch.randint(-4, 5, shape, generator=g).float()
        step = step + (i == 1) * 0.002 * torch.randn(shape, generator=g)  # model 2: distinct magnitudes too
        step.view(-1)[::4] = 0.0
        xs.append((base + step).to(torch.bfloat16))
    return base.to(torch.bfloat16), xs


def _params(method, rescale, normalize, eps):
    return params_for(
        method, 3, {"density": [0.5, 1.0, 0.3], "epsilon": [eps, eps, eps / 2]},
        rescale=rescale, normalize=normalize, **{"lambda": 1.3},
    )  # fmt: skip


WEIGHTS = [0.6, 1.1, -0.4]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _pieces(base, xs, rows):
    """(flat offset, base rows, inputs rows) in chunks of `rows` rows (1-D: `rows` elements)."""
    per = base.numel() // base.shape[0]
    for r0 in range(0, base.shape[0], rows):
        yield r0 * per, base[r0 : r0 + rows], [x[r0 : r0 + rows] for x in xs]


def _plain_chunked(method, base, xs, p, cd, rows):
    """The plain Streamed form over row chunks (as engine/chunked.py runs it with --fused off)."""
    spec = METHODS[method]
    ctx = TensorCtx(name=NAME, seed=11, shape=tuple(base.shape))
    st = spec.streamed.init(p, ctx, len(xs))
    for k in range(spec.streamed.passes):
        for off, b, x in _pieces(base.to(cd), [t.to(cd) for t in xs], rows):
            ctx.offset = off
            spec.streamed.gather(st, k, b, x, p, ctx)
        spec.streamed.end_pass(st, k)
    out = []
    for off, b, x in _pieces(base.to(cd), [t.to(cd) for t in xs], rows):
        ctx.offset = off
        out.append(spec.streamed.apply(st, b, x, WEIGHTS, p, ctx).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("cd", DTYPES)
@pytest.mark.parametrize("rescale,normalize", [("l1", False), ("inv_p", True), ("l1", True), ("none", False)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fast_equals_plain_whole_and_chunked(method, cd, rescale, normalize, eps, shape, monkeypatch):
    if shape == "3d":  # the ranks in pieces of one row each on the thread pool
        monkeypatch.setattr(della, "PIECE", 100)
    if shape == "2d":  # the merge in flat pieces (not whole rows) on the thread pool
        monkeypatch.setattr(della, "MERGE_PIECE", 1000)
    base, xs = _inputs(SHAPES[shape])
    p = _params(method, rescale, normalize, eps)
    ctx = TensorCtx(name=NAME, seed=11)
    ref = METHODS[method].kernel(base.to(cd), [x.to(cd) for x in xs], WEIGHTS, p, ctx)
    out, kept, *_ = run_della(method, base, xs, WEIGHTS, p, cd, TensorCtx(name=NAME, seed=11), 0, cd)
    assert torch.equal(_bits(out), _bits(ref))
    assert [k / base.numel() for k in kept] == ctx.stats["kept_fraction"]
    assert 0 < kept[0] < base.numel() and kept[2] < kept[0]  # the drop happened

    rows = 700 if shape == "1d" else 5  # row chunks; a 1-D tensor's chunk is one row (as the plain path)
    ref = _plain_chunked(method, base, xs, p, cd, rows)
    fac = chunk_factors(p, lambda: _pieces(base, xs, rows), ctx, cd)
    got = torch.cat([
        run_della(method, b, x, WEIGHTS, p, cd, ctx, off, cd, fac)[0].reshape(-1)
        for off, b, x in _pieces(base, xs, rows)
    ])  # fmt: skip
    assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("cd", DTYPES)
def test_fast_rank_rounding_long_rows(cd):
    """Rows long enough that rank -> compute dtype rounds (bf16 past 256, fp16 past 2048, and to inf past
    65504): q follows torch's per-op rounding."""
    base, xs = _inputs((70_000,), seed=3)
    p = _params("della_linear", "inv_p", False, 0.15)
    ref = METHODS["della_linear"].kernel(
        base.to(cd), [x.to(cd) for x in xs], WEIGHTS, p, TensorCtx(NAME, seed=2)
    )
    out = run_della("della_linear", base, xs, WEIGHTS, p, cd, TensorCtx(NAME, seed=2), 0, cd)[0]
    assert torch.equal(_bits(out), _bits(ref))


def test_mergekit_recipe_bf16_end_to_end(tmp_path):
    """A mergekit-format della recipe in bf16 (rescale l1 from mergekit's defaults) runs on the native
    kernels, whole and with the embedding in row chunks, with the bits of --fused off."""
    emb = "model.embed_tokens.weight"
    g = torch.Generator().manual_seed(4)
    base = {emb: torch.randn(600, 48, generator=g), "model.norm.weight": torch.ones(48),
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=g)}  # fmt: skip
    paths = {"base": write_model(tmp_path / "base", {k: v.to(torch.bfloat16) for k, v in base.items()})}
    for i in range(2):
        sd = {k: (v + 2.0**-6 * torch.randint(-3, 4, v.shape, generator=g)).to(torch.bfloat16)
              for k, v in base.items()}  # fmt: skip
        paths[i] = write_model(tmp_path / f"e{i}", sd)
    for method in ("della", "della_linear"):
        recipe = write_recipe(
            tmp_path / f"{method}.yaml",
            f"merge_method: {method}\nbase_model: {paths['base']}\nmodels:\n"
            f"  - model: {paths[0]}\n    parameters: {{weight: 1.0, density: 0.4, epsilon: 0.1}}\n"
            f"  - model: {paths[1]}\n    parameters: {{weight: 0.7, density: 0.6, epsilon: 0.2}}\n"
            "parameters: {normalize: true}\ndtype: bfloat16\nout_dtype: bfloat16\n",
        )
        ref, plain = merge_in_process(tmp_path, recipe, f"{method}-plain", fused="off")
        assert plain.engine.kernels.startswith("plain")
        for label, budget in (("whole", 1 << 30), ("chunked", 120_000)):
            got, res = merge_in_process(tmp_path, recipe, f"{method}-{label}", max_memory=budget)
            assert res.report["engine"]["kernels"] == "native"
            assert (emb in res.engine.chunked) == (label == "chunked")
            assert set(got) == set(ref)
            for name in ref:
                assert torch.equal(_bits(got[name]), _bits(ref[name])), (method, label, name)


def _keys_range(tau: torch.Tensor, cd) -> list[int]:
    """Per row, the span of the compacted sort keys mk_della_q ranks by (to check which path a row takes)."""
    k = tau.abs().to(cd).view(torch.int32 if cd == torch.float32 else torch.int16).to(torch.int64)
    out = []
    for row in k.reshape(k.shape[0], -1):
        nz = [int(v) for v in row if v]
        if not nz:
            out.append(1)
            continue
        vary = functools.reduce(operator.or_, nz) ^ functools.reduce(operator.and_, nz)
        lo = (vary & -vary).bit_length() - 1 if vary else 0
        out.append((max(nz) >> lo) - (min(nz) >> lo) + 2)
    return out


@pytest.mark.parametrize("cd", DTYPES)
def test_fast_equals_plain_on_every_ranking_path(cd):
    """Rows whose magnitudes are all tied or zero, span a few keys (a counting sort), span many (the radix
    sort on 16-bit keys) or very many (fp32: the 64-bit items): fp32 inputs, rounded to cd as read."""
    g = torch.Generator().manual_seed(8)
    rows, n = 8, 300
    base = torch.randn(rows, n, generator=g)
    tau = torch.empty(rows, n)
    tau[0] = 0.0
    tau[1] = 0.25 * torch.sign(torch.randn(n, generator=g))  # one magnitude, both signs
    tau[2:4] = 2.0**-7 * torch.randint(-3, 4, (2, n), generator=g)  # few keys: counting sort
    tau[4:] = torch.randn(4, n, generator=g) * 10.0 ** (-6 * torch.rand(4, n, generator=g))  # many keys
    xs = [base + tau, base - 0.5 * tau, base + tau.roll(1, 1)]
    spans = _keys_range(xs[0].to(cd) - base.to(cd), cd)
    assert min(spans[4:]) > 4 * n  # not the counting sort
    if cd == torch.float32:
        assert max(spans[4:]) > 65536  # the 64-bit items
    for method, rescale in (("della_linear", "inv_p"), ("della", "l1")):
        p = _params(method, rescale, True, 0.2)
        ref = METHODS[method].kernel(base.to(cd), [x.to(cd) for x in xs], WEIGHTS, p, TensorCtx(NAME, seed=5))
        out = run_della(method, base, xs, WEIGHTS, p, cd, TensorCtx(NAME, seed=5), 0, cd)[0]
        assert torch.equal(_bits(out), _bits(ref)), method


def test_without_a_compiler_della_says_why(monkeypatch):
    """The ranks are native only: without the native kernels della runs on the plain kernels, and says so."""
    from merge_cli.kernels.choice import why_plain

    p = _params("della", "l1", True, 0.1)
    assert why_plain("della", p, torch.float32) is None
    monkeypatch.setattr(native, "lib", lambda: None)
    monkeypatch.setattr(native, "_why", ["no C compiler found (set CC)"])
    for cd in (torch.float32, torch.bfloat16):
        assert why_plain("della_linear", p, cd) == (
            "della_linear needs the native kernels (no C compiler found (set CC))"
        )
