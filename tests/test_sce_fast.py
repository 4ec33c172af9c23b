"""sce on the fast path (kernels/sce.py): bitwise the plain kernel (methods/sce.py) in every compute dtype,
for numerics mergekit and exact, select_topk < 1 and = 1, whole tensors and row chunks; the variance
emulation against torch.var; the tied-threshold fallback; one end-to-end run of a mergekit-format recipe."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import chunked_family, merge_in_process, run_cli, write_recipe
from method_helpers import params_for

from merge_cli.kernels import native
from merge_cli.kernels import sce as fast
from merge_cli.kernels.blocked import NonFinite
from merge_cli.kernels.dispatch import whole
from merge_cli.methods import METHODS, TensorCtx

pytestmark = pytest.mark.skipif(
    native.lib() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EMB = "model.embed_tokens.weight"


def _dtypes():
    return [d for d in DTYPES if d != torch.float16 or native.has_f16()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _inputs(shape, cd, seed: int, quantised: bool):
    """base + 3 experts in cd: a fifth of the entries unchanged in every model (zero variance), quantised
    deltas (ties in the variance) or Gaussian ones, and a third expert of tiny energy (its weight ~1e-9,
    0 in fp16) that alone moves some entries where the base is 0: there sce's denominator is below 1e-6
    and its clamp decides."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    base.view(-1)[3::11] = 0.0
    base = base.to(cd)
    xs = []
    for i in range(3):
        if quantised:
            d = 2.0**-7 * torch.randint(-4, 5, shape, generator=g).float() * (1 + i)
        else:
            d = 0.01 * torch.randn(shape, generator=g)
        if i == 2:
            d = torch.zeros(shape)
            d.view(-1)[3::11] = 1e-6 * torch.randn(d.view(-1)[3::11].shape, generator=g)
        xs.append((base.float() + d).to(cd))
        xs[-1].view(-1)[::5] = base.view(-1)[::5]
    for x in xs[:2]:
        x.view(-1)[3::22] = base.view(-1)[3::22]  # only the tiny expert moves these
    return base, xs


@pytest.mark.parametrize("cd", _dtypes(), ids=str)
def test_variance_is_torch_var_bit_for_bit(cd):
    """mk_sce_prep's variance (Welford in double, double -> float -> cd) against torch.var(dim=0,
    unbiased=False) on the stacked task vectors: random scales, repeated values, huge and tiny ranges,
    values where double rounding through fp32 matters, 1 to 9 models."""
    g = torch.Generator().manual_seed(7)
    for m in (1, 2, 3, 4, 5, 9):
        for scale in (1e-6, 1e-2, 1.0, 3e3 if cd != torch.float16 else 300.0):
            base = (torch.randn(4099, generator=g) * scale).to(cd)
            xs = [(base.float() + torch.randn(4099, generator=g) * scale * (i + 1)).to(cd) for i in range(m)]
            xs[0][:300] = base[:300]  # some zero deltas
            xs[-1][300:600] = xs[0][300:600]  # some equal deltas
            # adversarial: deltas of one ulp pattern, so m2 / m lands on rounding midpoints
            ulp = 2.0 ** torch.randint(-20, 4, (500,), generator=g).float()
            steps = ulp * torch.randint(-3, 4, (500,), generator=g)
            xs[-1][600:1100] = (base[600:1100].float() + steps).to(cd)
            stacked = torch.stack([x - base for x in xs])
            stk, var, _, _ = fast.prep(base, xs, cd)
            assert torch.equal(_bits(stk), _bits(stacked))
            assert torch.equal(_bits(var), _bits(stacked.var(dim=0, unbiased=False))), (m, scale)


def _both(base, xs, cd, out_dtype, **params):
    p = params_for("sce", len(xs), **params)
    ctx = TensorCtx(name="w")
    want = METHODS["sce"].kernel(base, xs, [1.0] * len(xs), p, ctx)
    stats: dict = {}
    got = whole("sce", base, xs, [1.0] * len(xs), p, out_dtype, stats, cd=cd)
    return got, want.to(out_dtype), stats, ctx.stats


@pytest.mark.parametrize("cd", _dtypes(), ids=str)
@pytest.mark.parametrize("numerics", ["mergekit", "exact"])
@pytest.mark.parametrize("topk", [0.3, 1.0])
def test_whole_tensor_bitwise(cd, numerics, topk):
    """1-D and 2-D tensors (tiles crossed), zero-variance entries, tied variances, fp32 and cd outputs."""
    for seed, (shape, quantised) in enumerate(
        [((3001,), False), ((67, 97), False), ((3001,), True), ((67, 97), True)]
    ):
        base, xs = _inputs(shape, cd, seed, quantised)
        for out_dtype in {cd, torch.float32}:
            got, want, st, ref = _both(base, xs, cd, out_dtype, select_topk=topk, numerics=numerics)
            assert torch.equal(_bits(got), _bits(want)), (shape, quantised, out_dtype)
            assert st["weights"] == ref["weights"]
            assert st["kept_fraction"] == ref["kept_fraction"]


@pytest.mark.parametrize("cd", _dtypes(), ids=str)
def test_one_two_and_five_models(cd):
    g = torch.Generator().manual_seed(2)
    for m in (1, 2, 5):
        base = torch.randn(2000, generator=g).to(cd)
        xs = [(base.float() + 0.01 * torch.randn(2000, generator=g) * (1 + i)).to(cd) for i in range(m)]
        for topk, numerics in ((0.3, "mergekit"), (1.0, "mergekit"), (0.3, "exact")):
            got, want, st, ref = _both(base, xs, cd, cd, select_topk=topk, numerics=numerics)
            assert torch.equal(_bits(got), _bits(want)) and st["weights"] == ref["weights"], (m, topk)


def test_mergekit_tied_threshold_keeps_topks_choice(monkeypatch):
    """numerics: mergekit with a top-k threshold shared by more entries than it keeps: torch.topk's own
    choice among them (not the lowest indices); with no such tie, the threshold alone (topk not called)."""
    base = torch.zeros(200)
    xs = [torch.zeros(200), torch.zeros(200), torch.zeros(200)]
    xs[0][:120] = 1.0  # 120 equal variances, k = int(120 * 0.5) = 60 of them: a choice among ties
    xs[1][::7] = -0.5
    got, want, _, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.5, numerics="mergekit")
    assert torch.equal(got, want)
    exact, _, _, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.5, numerics="exact")
    assert not torch.equal(got, exact)  # lowest index first is another choice
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs[0][:120] = torch.arange(120) / 7.0  # distinct variances: the threshold alone decides
    got, want, _, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.5, numerics="mergekit")
    assert torch.equal(got, want)
    assert len(calls) == 1  # the plain kernel's call only


def test_topk_choice_is_torch_topks():
    """kernels.c mk_topk_set (the library's nth_element steps, block-scanned partition) keeps the same
    positions as torch.topk on values with many ties (few levels), in each dtype, k across the range."""
    assert fast._emulation_agrees()
    g = torch.Generator().manual_seed(9)
    for trial in range(48):
        n = int(torch.randint(4, 3000, (1,), generator=g)) if trial % 4 else 150_001
        levels = int(torch.randint(1, 400, (1,), generator=g))
        dt = _dtypes()[trial % len(_dtypes())]
        v = (torch.randint(0, levels, (n,), generator=g).float() * 0.37).to(dt)
        if trial % 6 == 0:
            v = torch.rand(n, generator=g).to(dt)
        k = int(torch.randint(n // 64 + 1, n + 1, (1,), generator=g))
        keep = torch.empty(n, dtype=torch.bool)
        assert fast._lib().mk_topk_set(n, v.data_ptr(), native.DTYPES[dt], k, keep.data_ptr()) == 0
        assert torch.equal(keep, fast._torch_topk_set(v, k)), (n, levels, k, dt)


def test_topk_falls_back_to_torch_where_it_cannot_repeat_it(monkeypatch):
    """torch.topk's partial-sort branch (k * 64 <= n: its heap order) and a torch whose topk disagrees
    with the emulation (checked once per process) run torch.topk itself: still the plain bits."""
    base = torch.zeros(20_000)
    xs = [torch.zeros(20_000) for _ in range(3)]
    xs[0][:200] = 1.0  # 200 tied non-zero variances, k = 60: 60 * 64 <= 20000
    calls = []
    real = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, want, _, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.3, numerics="mergekit")
    assert torch.equal(got, want) and len(calls) == 2  # the plain kernel's and the fast path's
    xs[0][:10_000] = 1.0  # k = 3000: the nth_element branch, emulated unless the check failed
    monkeypatch.setattr(fast, "_emulation_agrees", lambda: False)
    got, want, _, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.3, numerics="mergekit")
    assert torch.equal(got, want) and len(calls) == 4


def test_more_than_16_models_stay_plain():
    """torch sums more than 17 rows over dim 0 in groups of 16: the fast path declines, with the reason."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(500, generator=g)
    for m, served in ((16, True), (20, False)):
        xs = [base + 0.01 * torch.randn(500, generator=g) * (1 + i % 5) for i in range(m)]
        got, want, st, _ = _both(base, xs, torch.float32, torch.float32, select_topk=0.5)
        assert (got is not None) == served
        assert torch.equal(got, want) if served else "more than 16 models" in st["_plain_why"]


def test_the_report_names_the_kernels(monkeypatch):
    """sce is served in every compute dtype; without the native kernels (it has no eager form) the reason
    names them, in fp32 as well."""
    from merge_cli.kernels.choice import why_plain

    p = params_for("sce", 3, select_topk=0.3)
    assert all(why_plain("sce", p, cd) is None for cd in _dtypes())
    monkeypatch.setattr(native, "lib", lambda: None)
    monkeypatch.setattr(native, "_why", ["no C compiler found (set CC)"])
    assert why_plain("sce", p, torch.float32) == "sce needs the native kernels (no C compiler found (set CC))"
    assert why_plain("ties", params_for("ties", 3, density=0.5), torch.float32) is None  # eager blocked


def test_nonfinite_input_is_reported():
    base = torch.zeros(50)
    xs = [torch.ones(50), torch.zeros(50)]
    xs[1][7] = float("nan")
    with pytest.raises(NonFinite):
        fast.prep(base, xs)


def _models(tmp_path, dtype=torch.bfloat16):
    return chunked_family(tmp_path, dtype, seed=5, spread=True)


def _recipe(tmp_path, m, dtype: str, params: str, name: str = "r.yaml"):
    models = "".join(f"  - model: {m[e]}\n" for e in ("e0", "e1", "e2"))
    return write_recipe(
        tmp_path / name,
        f"merge_method: sce\nbase_model: {m['base']}\nmodels:\n{models}parameters: {{{params}}}\n"
        f"dtype: {dtype}\nout_dtype: bfloat16\n",
    )


@pytest.mark.parametrize(
    "dtype,params",
    [
        ("float32", "select_topk: 0.3"),
        ("bfloat16", "select_topk: 0.3"),
        ("float16", "select_topk: 0.3, numerics: exact"),
        ("bfloat16", "select_topk: 1.0, numerics: exact"),
    ],
)
def test_row_chunks_bitwise(tmp_path, dtype, params):
    """A budget that sends the embedding to row chunks: the fast chunked path (statistics passes, then the
    native erase per chunk) against the plain streamed kernel (sce.STREAM) with the same budget."""
    if dtype == "float16" and not native.has_f16():
        pytest.skip("the C compiler has no _Float16")
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, dtype, params)
    ref, plain = merge_in_process(tmp_path, recipe, "plain", max_memory=600_000, fused="off")
    got, res = merge_in_process(tmp_path, recipe, "fast", max_memory=600_000)
    assert EMB in res.engine.chunked and EMB in plain.engine.chunked
    assert res.engine.kernels.startswith("native"), res.engine.kernels
    for name in ref:
        assert torch.equal(_bits(ref[name]), _bits(got[name])), name


def test_cli_mergekit_recipe_bf16_native_same_tensors(tmp_path):
    """merge-cli run of a mergekit-format recipe with dtype: bfloat16: the report says native (or native
    with the tied tensors on the plain kernels) and every tensor equals the --fused off run's."""
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, "bfloat16", "select_topk: 0.3")
    for label, extra in (("fast", []), ("plain", ["--fused", "off"])):
        r = run_cli("run", recipe, tmp_path / label, "-q", *extra)
        assert r.exit_code == 0, r.stderr
    report = json.loads((tmp_path / "fast" / "merge_report.json").read_text())
    assert report["engine"]["kernels"].startswith("native"), report["engine"]["kernels"]
    from helpers import load_output

    a, b = load_output(tmp_path / "fast"), load_output(tmp_path / "plain")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(_bits(a[name]), _bits(b[name])), name
