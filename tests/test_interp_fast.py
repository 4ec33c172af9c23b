"""The fast kernels of slerp, nuslerp (kernels/interp.py) and model_stock (kernels/stock.py): bitwise the plain
kernels' output in the same compute dtype (fp32, bf16, fp16), for both numerics, every nuslerp mode with and
without a base, model_stock's filter_wise, 1-D/2-D/3-D tensors (colinear and zero vectors, |cos| at the lerp
threshold), whole and in row chunks (against the plain Streamed forms); and end to end, a mergekit-format
recipe with `dtype: bfloat16` runs them on the fast path with the bits of `--fused off`."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_output, merge_in_process, write_model, write_recipe
from method_helpers import params_for

from merge_cli.kernels import interp
from merge_cli.kernels.dispatch import interp_chunked, run_interp
from merge_cli.methods import METHODS, TensorCtx
from merge_cli.methods import slerp as S

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
CDS = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(301,), (37, 29), (5, 7, 11)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Tiles of 64 entries and mergekit norm chunks of 100 (both kernels read MK_CHUNK), so every tensor
    crosses many block and chunk boundaries; scratch kept up to 1500 bytes, so the 1-D tensors take slerp's
    widened-copy path and the others its cast-per-chunk path for huge tensors."""
    monkeypatch.setattr(interp, "BLOCK", 64)
    monkeypatch.setattr(interp, "KEEP", 1500)
    monkeypatch.setattr(S, "MK_CHUNK", 100)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT[a.dtype]), b.view(INT[b.dtype]))
    )


def _near_threshold(a: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """b with cos(a, b) = 0.9995 (the lerp threshold) up to rounding: some land on each side."""
    o = torch.randn(a.shape, generator=g)
    o = o - (o * a).sum() / (a * a).sum() * a
    c = 0.9995
    return c * a / a.norm() + math.sqrt(1 - c * c) * o / o.norm()


def cases(shape, n: int, with_base: bool, seed: int = 0):
    """(label, base, xs) input sets in bf16 (as checkpoints are): random, colinear (x = 2 base, x = -base,
    task vectors colinear), zero task vectors, |cos| at the threshold, and rows of each kind mixed."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    rnd = [base + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]
    tau = torch.randn(shape, generator=g)
    out = [
        ("random", base, rnd),
        (
            "colinear",
            base,
            [2 * base, -base, base][:n] if not with_base else [base + tau * (i + 1) for i in range(n)],
        ),
        ("zero", base, [base.clone() for _ in range(n)] if with_base else [torch.zeros(shape)] * n),
        (
            "threshold",
            torch.zeros(shape) if with_base else base,
            [base] + [_near_threshold(base, g)] * (n - 1),
        ),
    ]
    mixed = [x.clone() for x in rnd]
    if len(shape) > 1:
        mixed[0][::3] = base[::3] * (1 if with_base else 2)
        mixed[-1][1::3] = base[1::3]
        mixed[0][..., ::4] = 0
    out.append(("mixed rows", base, mixed))
    return [(lab, b.bfloat16(), [x.bfloat16() for x in xs]) for lab, b, xs in out]


def plain_whole(method, base, xs, weights, p, cd, out_dtype):
    ctx = TensorCtx(name="w")
    b = base.to(cd) if base is not None else None
    out = METHODS[method].kernel(b, [x.to(cd) for x in xs], list(weights), p, ctx)
    return out.to(out_dtype), ctx.stats


def fast_whole(method, base, xs, weights, p, cd, out_dtype):
    ctx, stats = TensorCtx(name="w"), {}
    out = run_interp(method, base, xs, weights, p, out_dtype, stats, ctx, cd)
    return out, {k: v for k, v in stats.items() if not k.startswith("_")}


def _chunks(base, xs, rows):
    for r0 in range(0, xs[0].shape[0], rows):
        yield (base[r0 : r0 + rows] if base is not None else None), [x[r0 : r0 + rows] for x in xs]


def plain_chunked(method, base, xs, weights, p, cd, out_dtype, rows):
    st, ctx = METHODS[method].streamed, TensorCtx(name="w")
    state = st.init(p, ctx, len(xs))
    prep = lambda b, ys: (b.to(cd) if b is not None else None, [y.to(cd) for y in ys])  # noqa: E731
    for k in range(st.passes):
        for b, ys in _chunks(base, xs, rows):
            st.gather(state, k, *prep(b, ys), p, ctx)
        st.end_pass(state, k)
    out = [
        st.apply(state, *prep(b, ys), list(weights), p, ctx).to(out_dtype)
        for b, ys in _chunks(base, xs, rows)
    ]
    if st.finish:
        st.finish(state, ctx)
    return torch.cat(out), ctx.stats


def fast_chunked(method, base, xs, weights, p, cd, out_dtype, rows):
    ctx = TensorCtx(name="w")
    state = METHODS[method].streamed.init(p, ctx, len(xs))
    gather, apply = interp_chunked(method, p, cd)
    for b, ys in _chunks(base, xs, rows):
        gather(state, b, ys)
    out = [apply(state, b, ys, list(weights), out_dtype, ctx)[0] for b, ys in _chunks(base, xs, rows)]
    st = METHODS[method].streamed
    if st.finish:
        st.finish(state, ctx)
    return torch.cat(out), ctx.stats


CONFIGS = [
    ("slerp", {"t": 0.3, "numerics": "mergekit"}),
    ("slerp", {"t": 0.7, "numerics": "exact"}),
    *[
        ("nuslerp", {"numerics": num, "nuslerp_flatten": flat, "nuslerp_row_wise": rw, "base": wb})
        for num in ("mergekit", "exact")
        for flat, rw in ((True, False), (False, False), (False, True))
        for wb in (True, False)
    ],
    *[
        ("model_stock", {"numerics": num, "filter_wise": fw, "clamp_cos": num == "exact", "angle_mean": am})
        for num in ("mergekit", "exact")
        for fw in (False, True)
        for am in (False, True)
    ],
]


@pytest.mark.parametrize("cd", CDS, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method,cfg", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)])
def test_fast_is_bitwise_the_plain_kernel(method, cfg, cd):
    cfg = dict(cfg)
    with_base = cfg.pop("base", True)
    n = {"slerp": 1, "nuslerp": 2, "model_stock": 3}[method]
    per_model = {"weight": [0.3, 0.9]} if method == "nuslerp" else None
    p = params_for(method, n, per_model, **cfg)
    weights = [0.3, 0.9] if method == "nuslerp" else [1.0] * n
    checked = 0
    for shape in SHAPES:
        for label, base, xs in cases(shape, n, with_base):
            b = base if with_base else None
            for out_dtype in {cd, torch.bfloat16}:
                want, wst = plain_whole(method, b, xs, weights, p, cd, out_dtype)
                got, gst = fast_whole(method, b, xs, weights, p, cd, out_dtype)
                assert same_bits(want, got), (shape, label, out_dtype, "whole")
                assert wst == gst, (shape, label)
                checked += 1
            if len(shape) < 2:
                continue
            for rows in (3,):
                want, wst = plain_chunked(method, b, xs, weights, p, cd, cd, rows)
                got, gst = fast_chunked(method, b, xs, weights, p, cd, cd, rows)
                assert same_bits(want, got), (shape, label, rows, "chunked")
                assert wst == gst, (shape, label, rows)
                checked += 1
    assert checked >= 25


@pytest.mark.parametrize(
    "method,cfg", [CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[8], CONFIGS[14], CONFIGS[18]]
)
def test_fp32_inputs_and_a_tensor_big_enough_for_threaded_reductions(method, cfg, monkeypatch):
    """fp32 checkpoints in bf16 compute (cast as read), whole and in row chunks, and 320 x 256 entries: torch
    splits reductions of more than 32768 entries over threads, and the fast kernels reduce the same tensors
    the same way."""
    monkeypatch.setattr(interp, "BLOCK", 5000)  # 16 tiles of whole rows
    cfg = dict(cfg)
    with_base = cfg.pop("base", True)
    n = {"slerp": 1, "nuslerp": 2, "model_stock": 3}[method]
    p = params_for(method, n, {"weight": [0.6, 0.2]} if method == "nuslerp" else None, **cfg)
    weights = [0.6, 0.2] if method == "nuslerp" else [1.0] * n
    g = torch.Generator().manual_seed(3)
    base = torch.randn(320, 256, generator=g)
    xs = [base + 0.01 * torch.randn(320, 256, generator=g) for _ in range(n)]
    b = base if with_base else None
    for cd in (torch.bfloat16, torch.float32):
        want, _ = plain_whole(method, b, xs, weights, p, cd, torch.float32)
        got, _ = fast_whole(method, b, xs, weights, p, cd, torch.float32)
        assert same_bits(want, got), cd
        want, _ = plain_chunked(method, b, xs, weights, p, cd, torch.float32, 150)
        got, _ = fast_chunked(method, b, xs, weights, p, cd, torch.float32, 150)
        assert same_bits(want, got), (cd, "chunked")


# ---- end to end: mergekit-format recipes, fast path vs --fused off -----------------------------------------

EMB = "model.embed_tokens.weight"


def _models(tmp_path):
    g = torch.Generator().manual_seed(5)
    base = {
        EMB: torch.randn(3000, 64, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g),
        "model.norm.weight": torch.ones(64),
    }
    paths = {"base": write_model(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()})}
    for i in range(3):
        sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        sd[EMB][::5] = base[EMB][::5].bfloat16()
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", sd)
    return paths


RECIPES = {
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {e0}\n"
    "parameters:\n  t: 0.4\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: {e0}\n    parameters: {{weight: 0.4}}\n"
    "  - model: {e1}\n    parameters: {{weight: 0.7}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\n"
    "  - model: {e2}\n",
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_mergekit_recipe_in_bf16_runs_fast_with_the_plain_bits(tmp_path, method):
    m = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml", RECIPES[method].format(**m) + "dtype: bfloat16\nout_dtype: bfloat16\n"
    )
    for label, budget in (
        ("whole", 1 << 30),
        ("chunked", 600_000),
    ):  # the plain chunked form is the reference
        ref, plain = merge_in_process(tmp_path, recipe, "plain-" + label, max_memory=budget, fused="off")
        assert plain.engine.kernels.startswith("plain")
        got, res = merge_in_process(tmp_path, recipe, label, max_memory=budget)
        assert res.engine.kernels == "native" or res.engine.kernels.startswith("eager blocked"), (
            res.engine.kernels
        )
        assert res.report["engine"]["kernels"] == res.engine.kernels
        assert (EMB in res.engine.chunked) == (label == "chunked")
        assert set(got) == set(ref)
        for name in ref:
            assert same_bits(ref[name], got[name]), (label, name)


@pytest.mark.parametrize("method", list(RECIPES))
def test_nan_or_inf_in_a_source_stops_the_fast_path_as_the_plain_one(tmp_path, method):
    """The fast kernels flag non-finite norms; the engine then names the model and tensor, as without them."""
    from merge_cli.errors import CheckpointError

    m = _models(tmp_path)
    bad = {k: v.clone() for k, v in load_output(m["e0"]).items()}
    bad["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    bad[EMB][2500, 7] = float("inf")
    m["e0"] = write_model(tmp_path / "bad", bad)
    recipe = write_recipe(tmp_path / "r.yaml", RECIPES[method].format(**m) + "dtype: bfloat16\n")
    for budget in (1 << 30, 600_000):
        msgs = []
        for fused in ("off", "auto"):
            with pytest.raises(CheckpointError) as e:
                merge_in_process(tmp_path, recipe, f"{fused}-{budget}", max_memory=budget, fused=fused)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] and "model 'bad'" in msgs[0], msgs
