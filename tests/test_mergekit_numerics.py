"""`numerics: mergekit` (slerp, multislerp, karcher, arcee_fusion, linear, ties, breadcrumbs*, model_stock, nuslerp,
sce): mergekit-format recipes select it, and each method then computes what mergekit 0.1.5's arithmetic gives
(MERGEKIT.md §3, docs/mergekit-compat.md §3). Also the summation order every recipe now gets (fp32 accumulation
of bf16 sums, fused multiply-adds in linear).

References are written here: hand-computed values, and plain transcriptions of mergekit's formulas (one torch
op per step of the math, in the inputs' dtype) that the kernels must match bitwise; the exact path is checked
against float64 math. Chunked (streamed) forms are covered in test_methods_stream.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import write_recipe
from method_helpers import params_for, run_kernel, t

from merge_cli.methods.arcee_fusion import mk_ranks
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe

NUMERICS_METHODS = (
    "slerp",
    "multislerp",
    "karcher",
    "arcee_fusion",
    "linear",
    "ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "model_stock",
    "nuslerp",
    "sce",
)
# numerics: mergekit there means torch's sort order at tied magnitudes (a full sort per tensor and model):
# opt-in, so mergekit-format recipes keep the exact selection by default
SORT_OPT_IN = ("ties", "breadcrumbs", "breadcrumbs_ties")


def _jobs(path):
    plan = build_plan(load_recipe(path))
    try:
        return {j["name"]: j for j in plan.to_json()["jobs"]}
    finally:
        plan.close()


def _recipe(family, method: str, mergekit: bool, extra: str = "") -> str:
    base = method not in ("karcher", "linear")
    n = {"slerp": 1, "arcee_fusion": 1}.get(method, 2)
    models = [family[f"expert{i}"] for i in range(n)]
    if mergekit:
        lines = [f"merge_method: {method}"]
        if base:
            lines.append(f"base_model: {family['base']}")
        lines += ["models:"] + [f"  - model: {m}" for m in models]
        return "\n".join(lines) + "\n" + extra
    lines = [f"method: {method}"]
    if base:
        lines.append(f"base_model: {family['base']}")
    lines += ["models:"] + [f"  - model: {m}" for m in models]
    return "\n".join(lines) + "\n" + extra


@pytest.mark.parametrize("method", NUMERICS_METHODS)
def test_recipe_format_selects_numerics(tmp_path, family, method):
    mk = _jobs(write_recipe(tmp_path / "mk.yaml", _recipe(family, method, True)))
    native = _jobs(write_recipe(tmp_path / "native.yaml", _recipe(family, method, False)))
    default = "exact" if method in SORT_OPT_IN else "mergekit"
    assert {j["params"]["numerics"] for j in mk.values()} == {default}
    assert {j["params"]["numerics"] for j in native.values()} == {"exact"}
    # an explicit value in a mergekit-format recipe wins over mergekit's default (lowest precedence)
    own = _jobs(
        write_recipe(tmp_path / "own.yaml", _recipe(family, method, True, "parameters: {numerics: exact}\n"))
    )
    assert {j["params"]["numerics"] for j in own.values()} == {"exact"}
    # and a filter list without a catch-all falls back to the default for the other tensors
    mixed = _jobs(
        write_recipe(
            tmp_path / "mixed.yaml",
            _recipe(family, method, True, "parameters:\n  numerics: [{filter: mlp, value: exact}]\n"),
        )
    )
    for name, j in mixed.items():
        assert j["params"]["numerics"] == ("exact" if "mlp" in name else default), name
    if method in SORT_OPT_IN:  # the opt-in, from a mergekit-format recipe
        opt = _jobs(
            write_recipe(
                tmp_path / "opt.yaml", _recipe(family, method, True, "parameters: {numerics: mergekit}\n")
            )
        )
        assert {j["params"]["numerics"] for j in opt.values()} == {"mergekit"}


def test_methods_text_documents_numerics():
    from io import StringIO

    from rich.console import Console

    from merge_cli.commands.render import print_method
    from merge_cli.methods import METHODS

    for name in NUMERICS_METHODS:
        buf = StringIO()
        print_method(METHODS[name], Console(file=buf, width=400))
        text = buf.getvalue()
        assert "numerics" in text and "exact" in text and "mergekit" in text, name
        want = None if name in SORT_OPT_IN else "mergekit"
        assert METHODS[name].mergekit_defaults.get("numerics") == want


# ----------------------------------------------------------------------------------------------- slerp


def _plain_mk_slerp(tt: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of a tensor below 2^20 elements, step by step in fp32 (MERGEKIT.md §3)."""
    a, b = v0.reshape(-1).float(), v1.reshape(-1).float()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > 1e-8 else torch.tensor(1.0)
    nb = nb if nb > 1e-8 else torch.tensor(1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    tt32 = torch.tensor(tt, dtype=torch.float32)
    if dot.abs() > 0.9995:
        c0, c1 = 1 - tt32, tt32
    else:
        theta = torch.acos(dot)
        c0 = torch.sin((1 - tt32) * theta) / torch.sin(theta)
        c1 = torch.sin(tt32 * theta) / torch.sin(theta)
    return (c0 * a + c1 * b).reshape(v0.shape).to(v0.dtype)


def _slerp(tt, a, b, numerics):
    return run_kernel("slerp", a, [b], t=tt, numerics=numerics)[0]


def test_slerp_mergekit_hand_computed():
    # |v0| = 5, |v1| = 2; unit vectors [0.6, 0.8] and [0, 1]: dot = fp32(0.8), theta = arccos(0.8)
    v0, v1 = t([3.0, 4.0]), t([0.0, 2.0])
    theta = math.acos(0.8)
    for tt in (0.25, 0.5):
        c0, c1 = math.sin((1 - tt) * theta) / math.sin(theta), math.sin(tt * theta) / math.sin(theta)
        want = t([3 * c0, 4 * c0 + 2 * c1])
        for numerics in ("exact", "mergekit"):
            torch.testing.assert_close(_slerp(tt, v0, v1, numerics), want, rtol=4e-7, atol=0)
    # near-parallel (dot > 0.9995): lerp in fp32 in both
    assert torch.equal(_slerp(0.25, v0, 2 * v0, "mergekit"), t([3.75, 5.0]))


def test_slerp_mergekit_is_mergekits_fp32_arithmetic_bitwise():
    g = torch.Generator().manual_seed(3)
    differs = 0
    for k in range(6):
        a = torch.randn(1000, generator=g)
        b = a + (0.02 if k == 5 else 0.5) * torch.randn(1000, generator=g)  # k = 5: lerp regime
        for tt in (0.0, 0.3, 0.7, 1.0):
            mk = _slerp(tt, a, b, "mergekit")
            assert torch.equal(mk, _plain_mk_slerp(tt, a, b)), (k, tt)
            ex = _slerp(tt, a, b, "exact")
            differs += int(not torch.equal(mk, ex))
            # both are the same math: they agree to fp32 rounding of terms of magnitude |a|, |b|
            torch.testing.assert_close(mk, ex, rtol=0, atol=4 * 2**-23 * float(a.abs().max() + b.abs().max()))
    assert differs > 0  # the exact path (float64 coefficients) is a different evaluation


def test_slerp_mergekit_bf16_computes_in_fp32_and_rounds_once():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(300, generator=g).bfloat16(), torch.randn(300, generator=g).bfloat16()
    out = _slerp(0.4, a, b, "mergekit")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _plain_mk_slerp(0.4, a.float(), b.float()).bfloat16())


@pytest.mark.parametrize("numerics", ["exact", "mergekit"])
def test_slerp_invariants_both_paths(numerics):
    """METHODS.md §19: endpoints, symmetry, norm preservation, no NaN for zero or antiparallel inputs."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    torch.testing.assert_close(_slerp(0.0, a, b, numerics), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(_slerp(1.0, a, b, numerics), b, atol=1e-6, rtol=0)
    torch.testing.assert_close(_slerp(0.3, a, b, numerics), _slerp(0.7, b, a, numerics))
    c = b * (a.norm() / b.norm())
    assert float(_slerp(0.37, a, c, numerics).norm()) == pytest.approx(float(a.norm()), rel=1e-5)
    x = t([1.0, 2.0, 3.0])
    for other in (torch.zeros(3), -x, 2 * x, x + 1e-7):
        assert torch.isfinite(_slerp(0.4, x, other, numerics)).all()
    torch.testing.assert_close(_slerp(0.5, x, -x, numerics), torch.zeros(3))


# ------------------------------------------------------------------------------------------ multislerp


def _plain_mk_multislerp(base, xs, weights, eps=1e-8):
    """mergekit's multislerp (MERGEKIT.md §3, steps 1-5), literally, in the inputs' dtype."""
    x = torch.stack(xs)
    if base is not None:
        x = x - base
    flat = x.reshape(len(xs), -1)
    w = torch.tensor(weights, dtype=x.dtype)
    w = w / w.sum()
    n = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    u = flat / (n + eps)
    m = (u * w.view(-1, 1)).sum(0)
    m = m / torch.linalg.vector_norm(m)
    tau = ((u - (u * m).sum(-1, keepdim=True) * m) * w.view(-1, 1)).sum(0)
    tn = torch.linalg.vector_norm(tau) + eps
    out = (m * torch.cos(tn) + tau * (torch.sin(tn) / tn)) * (n.squeeze(-1) * w).sum()
    out = out.reshape(xs[0].shape)
    return out if base is None else out + base


def test_multislerp_mergekit_hand_computed():
    # weights 1/4, 3/4 of [3, 0] and [0, 1]: direction normalise([0.25, 0.75]), norm 0.25 * 3 + 0.75 * 1 = 1.5
    a, b = t([3.0, 0.0]), t([0.0, 1.0])
    d = t([0.25, 0.75]) / math.sqrt(0.25**2 + 0.75**2)
    for numerics in ("exact", "mergekit"):
        out, _ = run_kernel("multislerp", None, [a, b], per_model={"weight": [1.0, 3.0]}, numerics=numerics)
        torch.testing.assert_close(out, 1.5 * d, rtol=4e-7, atol=0)
        x = t([0.5, -2.0])
        out, _ = run_kernel("multislerp", None, [x, x, x], numerics=numerics)
        torch.testing.assert_close(out, x, rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multislerp_mergekit_matches_the_literal_formula_bitwise(dtype):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(40, 30, generator=g).to(dtype)
    xs = [(base.float() + 0.05 * torch.randn(40, 30, generator=g)).to(dtype) for _ in range(3)]
    w = [0.3, 0.5, 0.2]
    mk, _ = run_kernel("multislerp", base, xs, per_model={"weight": w}, numerics="mergekit")
    assert mk.dtype == dtype
    assert torch.equal(mk, _plain_mk_multislerp(base, xs, w))
    ex, _ = run_kernel("multislerp", base.float(), [x.float() for x in xs], per_model={"weight": w})
    tol = 4 * 2.0 ** -(23 if dtype == torch.float32 else 7)
    torch.testing.assert_close(mk.float(), ex, rtol=tol, atol=tol * float(base.float().abs().max()))
    if dtype == torch.bfloat16:  # computed in bf16 (as mergekit): not the fp32 evaluation rounded once
        assert not torch.equal(mk, ex.bfloat16())


# --------------------------------------------------------------------------------------------- karcher


def _plain_mk_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit's Karcher iteration (MERGEKIT.md §3), equal weights, on the full tensors in their dtype."""
    dt, k = xs[0].dtype, len(xs)
    norms = [torch.linalg.vector_norm(x.float()) for x in xs]
    units = [(x / n).to(dt) for x, n in zip(xs, norms, strict=True)]
    u = torch.zeros_like(units[0])
    for ui in units:
        u += (1.0 / k) * ui
    u = (u / torch.linalg.vector_norm(u.float())).to(dt)
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for ui in units:
            c = torch.clamp(torch.dot(u.reshape(-1), ui.reshape(-1)), -1.0, 1.0)
            phi = torch.arccos(c)
            if phi.item() >= tol:
                tangent += (1.0 / k) * (phi / torch.sin(phi)) * (ui - c * u)
        tn = torch.linalg.vector_norm(tangent.float())
        if tn.item() < tol:
            break
        u = (torch.cos(tn) * u + torch.sin(tn) * (tangent / tn)).to(dt)
        u = (u / torch.linalg.vector_norm(u.float())).to(dt)
    return sum((1.0 / k) * n for n in norms) * u


def _karcher(xs, numerics, **kw):
    return run_kernel("karcher", None, xs, numerics=numerics, **kw)


def test_karcher_mergekit_hand_computed():
    # two orthogonal directions of norm 2: the mean direction is [1, 0, 1]/sqrt(2) from the start (tangent ~ 0)
    out, stats = _karcher([t([2.0, 0.0, 0.0]), t([0.0, 0.0, 2.0])], "mergekit")
    torch.testing.assert_close(out, t([math.sqrt(2), 0.0, math.sqrt(2)]), rtol=2.4e-7, atol=0)
    assert stats["iterations"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_karcher_mergekit_matches_mergekits_iteration_bitwise(dtype):
    g = torch.Generator().manual_seed(7)
    common = torch.randn(50, 20, generator=g)
    xs = [(common + 0.6 * torch.randn(50, 20, generator=g)).to(dtype) for _ in range(3)]
    mk, stats = _karcher(xs, "mergekit")
    assert mk.dtype == dtype and stats["iterations"] >= 2
    assert torch.equal(mk, _plain_mk_karcher(xs))
    ex, _ = _karcher([x.float() for x in xs], "exact")
    tol = 16 * 2.0 ** -(23 if dtype == torch.float32 else 7)
    torch.testing.assert_close(mk.float(), ex, rtol=tol, atol=tol * float(ex.abs().max()))
    assert not torch.equal(mk.float(), ex)


@pytest.mark.parametrize("numerics", ["exact", "mergekit"])
def test_karcher_invariants_both_paths(numerics):
    """METHODS.md §19: N = 1 or identical inputs -> the input; output norm = mean norm; two equal-norm
    inputs -> slerp(0.5); permutation-invariant; zero inputs give no NaN."""
    x = t([1.0, -2.0, 0.5])
    torch.testing.assert_close(_karcher([x], numerics)[0], x)
    torch.testing.assert_close(_karcher([x, x, x], numerics)[0], x)
    a, b = t([2.0, 0.0, 0.0]), t([0.0, 0.0, 2.0])
    torch.testing.assert_close(_karcher([a, b], numerics)[0], _slerp(0.5, a, b, numerics))
    xs = [t([3.0, 0.2, 0.1]), t([0.1, 2.0, 0.3]), t([0.5, 0.4, 1.0])]
    out, _ = _karcher(xs, numerics, max_iter=50, tol=1e-7)
    norms = [math.sqrt(sum(v * v for v in x.tolist())) for x in xs]
    assert float(out.norm()) == pytest.approx(sum(norms) / 3, rel=1e-5)
    torch.testing.assert_close(
        _karcher(xs[::-1], numerics, max_iter=50, tol=1e-7)[0], out, atol=1e-5, rtol=1e-5
    )
    out, _ = _karcher([x, torch.zeros(3)], numerics)
    torch.testing.assert_close(out, x / 2)  # direction of x, mean norm |x| / 2
    out, _ = _karcher([torch.zeros(3), torch.zeros(3)], numerics)
    assert torch.equal(out, torch.zeros(3))
    assert torch.isfinite(_karcher([x, -x], numerics)[0]).all()


# ---------------------------------------------------------------------------------------- arcee_fusion


def _fusion(base, other, numerics):
    return run_kernel("arcee_fusion", base, [other], numerics=numerics)


def test_arcee_fusion_mergekit_quartiles_are_not_interpolated():
    # one row: every entry has the same KL factor, so the mask follows |d| against the quartile rule.
    # sorted |d| = 1, 2, 3, 4, 8, 9 (x 0.01), n - 1 = 5:
    #   mergekit: sorted[floor(q 5)] = sorted[1, 2, 3] -> 3 + 1.5 (4 - 2) = 6: keeps 8 and 9
    #   exact (interpolated): q1 = 2.25, median 3.5, q3 = 7 -> 3.5 + 1.5 * 4.75 = 10.625: keeps nothing
    base = torch.zeros(6)
    d = t([0.03, -0.01, 0.09, 0.02, -0.08, 0.04])
    out, stats = _fusion(base, d, "mergekit")
    assert torch.equal(out, t([0.0, 0.0, 0.09, 0.0, -0.08, 0.0]))
    assert stats["kept_fraction"] == [2 / 6]
    out, stats = _fusion(base, d, "exact")
    assert torch.equal(out, base) and stats["kept_fraction"] == [0.0]
    assert (
        mk_ranks(6) == [1, 2, 3]
        and mk_ranks(5) == [1, 2, 3]
        and mk_ranks(1_000_001) == [250_000, 500_000, 750_000]
    )


def _plain_mk_importance(base, other):
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arcee_fusion_mergekit_mask_is_mergekits(dtype):
    g = torch.Generator().manual_seed(8)
    base = (0.02 * torch.randn(64, 128, generator=g)).to(dtype)
    other = (base.float() + 0.002 * torch.randn(64, 128, generator=g)).to(dtype)
    imp = _plain_mk_importance(base, other)
    s = imp.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]  # no interpolation
    keep = imp >= med + 1.5 * (q3 - q1)  # rounded in the inputs' dtype
    out, stats = _fusion(base, other, "mergekit")
    # mergekit: base + d * float mask (fp32 when the inputs are bf16), here rounded to the inputs' dtype
    assert torch.equal(out, (base + (other - base) * keep.float()).to(dtype))
    assert stats["kept_fraction"] == [float(keep.float().mean())]


def test_arcee_fusion_kl_accuracy_of_both_paths():
    """Nearly equal rows (KL ~ 1e-7): mergekit's naive fp32 formula keeps only a few digits (its log of a
    ratio ~ 1 cancels); the exact path evaluates the KL in float64 and is accurate to fp32 rounding."""
    from merge_cli.methods.arcee_fusion import importance, importance_mergekit

    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(8, 256, generator=g)
    other = base + 1e-3 * torch.randn(8, 256, generator=g)
    d = (other - base).abs()
    j = d.argmax(dim=-1, keepdim=True)
    lp, lq = torch.log_softmax(other.double(), -1), torch.log_softmax(base.double(), -1)
    truth = (lp.exp() * (lp - lq)).sum(-1)
    errors = {}
    for name, fn in (("exact", importance), ("mergekit", importance_mergekit)):
        kl = (fn(base, other).gather(-1, j) / d.gather(-1, j)).squeeze(-1).double()
        errors[name] = float(((kl - truth) / truth).abs().max())
    assert errors["exact"] < 1e-6
    assert errors["mergekit"] > 1e-3


# ------------------------------------------------------------------------ linear: fp32 fused multiply-adds
def _mk_linear(xs, weights, normalize=True):
    """mergekit's linear, one op per step: an fp32 buffer, addcmul of each model with its fp32 weight, the
    division by the fp32 sum of the fp32 weights, rounded once to the inputs' dtype."""
    w = torch.tensor([weights], dtype=torch.float32)
    acc = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x, c in zip(xs, w.unbind(1), strict=True):
        acc.addcmul_(x, c)
    if normalize:
        acc.div_(w.sum(dim=1))
    return acc.to(xs[0].dtype)


@pytest.mark.parametrize("numerics", ["exact", "mergekit"])
def test_linear_fuses_each_product_into_its_add(numerics):
    from merge_cli.kernels import blocked as fused

    # -1 + (1 + 2^-12)^2 = 2^-11 + 2^-24 exactly; rounding the product first (to 1 + 2^-11) loses the 2^-24
    e = 2.0**-12
    xs = [t([-1.0]), t([1.0 + e])]
    out, _ = run_kernel(
        "linear", None, xs, per_model={"weight": [1.0, 1.0 + e]}, normalize=False, numerics=numerics
    )
    assert out.item() == 2.0**-11 + 2.0**-24
    got, _ = fused.linear(xs, [1.0, 1.0 + e], 1.0, torch.float32)
    assert got.item() == 2.0**-11 + 2.0**-24


def test_linear_bf16_accumulates_in_fp32_and_rounds_once():
    # 1 + 3 * 2^-9 = 1 + 0.75 bf16 steps: one rounding gives 1 + 2^-7; adding in bf16 would stay at 1
    xs = [t([1.0]).bfloat16()] + [t([2.0**-9]).bfloat16()] * 3
    out, _ = run_kernel("linear", None, xs, normalize=False)
    assert out.dtype == torch.bfloat16 and out.item() == 1.0 + 2.0**-7


def test_linear_mergekit_divisor_is_the_fp32_sum_of_fp32_weights():
    import numpy as np

    from merge_cli.kernels import dispatch as fused_methods

    w = [0.1, 0.1, 0.15]
    f32 = np.float32(w[0]) + np.float32(w[1]) + np.float32(w[2])  # fp32 sum of fp32 weights
    assert float(f32) != float(np.float32(sum(w)))  # the two divisors differ: the test can tell them apart
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(64, 48, generator=g).to(dtype) for _ in range(3)]
        mk, _ = run_kernel("linear", None, xs, per_model={"weight": w}, numerics="mergekit")
        assert torch.equal(mk, _mk_linear(xs, w)), dtype
        ex, _ = run_kernel("linear", None, xs, per_model={"weight": w}, numerics="exact")
        assert not torch.equal(mk, ex)
        if dtype == torch.float32:  # the blocked kernel: the same bits for either numerics
            for numerics, want in (("mergekit", mk), ("exact", ex)):
                p = params_for("linear", 3, {"weight": w}, numerics=numerics)
                got = fused_methods.whole("linear", None, xs, w, p, torch.float32, {})
                assert torch.equal(got, want), numerics


# ------------------------------------------------------------- TIES family: stacked sums, sorted selection
def _mk_gta(base, xs, weights, keep, consensus: bool, normalize: bool, lam: float = 1.0):
    """mergekit's generalized task arithmetic, one op per step on stacked tensors in the inputs' dtype:
    keep(delta) sparsifies, weights in that dtype, sign election on the stacked sum, masked stacked sums."""
    d = torch.stack([keep(i, x - base) for i, x in enumerate(xs)])
    w = torch.tensor(weights, dtype=d.dtype).reshape(-1, *([1] * base.dim()))
    d = d * w
    if consensus:
        majority = (d.sum(dim=0) >= 0).to(d.dtype) * 2 - 1
        mask = (d.sign() == majority).to(d.dtype)
        mixed, div = (d * mask).sum(dim=0), (w * mask).sum(dim=0)
        div[div == 0] = 1
    else:
        mixed, div = d.sum(dim=0), w.sum(dim=0)
    if normalize:
        mixed = mixed / div
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


def _mk_magnitude(density):
    def keep(i, delta):
        n = delta.numel()
        mask = torch.zeros(n, dtype=delta.dtype)
        mask[
            torch.argsort(delta.abs().reshape(-1).float(), descending=True)[: max(1, int(density[i] * n))]
        ] = 1
        return delta * mask.reshape(delta.shape)

    return keep


def _mk_outliers(density, gamma):
    def keep(i, delta):
        n = delta.numel()
        kept, top = int(density[i] * n), int(gamma[i] * n)
        bottom = max(0, n - kept - top)
        mask = torch.zeros(n, dtype=delta.dtype)
        mask[torch.sort(delta.abs().reshape(-1).float()).indices[bottom : bottom + kept]] = 1
        return delta * mask.reshape(delta.shape)

    return keep


def _quantised(dtype, seed=12, shape=(96, 40)):
    """A base and three experts whose deltas are multiples of 2^-8: many exact ties in |tau|."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + torch.randint(-12, 13, shape, generator=g) / 256).to(dtype) for _ in range(3)]
    return base, xs


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_ties_family_bf16_sums_round_once(method):
    # four models add 1 + 3 * 2^-9 to a zero base: one rounding of the fp32 sum gives 1 + 2^-7 in bf16 (both
    # numerics, native recipes too); adding model by model in bf16 would give 1
    base = t([0.0, 0.0]).bfloat16()
    xs = [t([1.0, 1.0]).bfloat16()] + [t([2.0**-9, 2.0**-9]).bfloat16()] * 3
    kw = {"merge_func": "sum", "density": 1.0} if method == "ties" else {"density": 1.0}
    for numerics in ("exact", "mergekit"):
        out, _ = run_kernel(method, base, xs, numerics=numerics, **kw)
        assert out.dtype == torch.bfloat16 and out.tolist() == [1.0 + 2.0**-7] * 2, numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_mergekit_is_mergekits_stacked_arithmetic_bitwise(dtype):
    base, xs = _quantised(dtype)
    density, w = [0.6, 0.3, 0.45], [0.6, 0.7, 1.0]
    for normalize, lam in ((True, 1.0), (False, 1.2)):
        out, _ = run_kernel(
            "ties", base, xs, per_model={"weight": w, "density": density}, numerics="mergekit",
            weighted_election=True, merge_func="mean" if normalize else "sum", **{"lambda": lam},
        )  # fmt: skip
        want = _mk_gta(base, xs, w, _mk_magnitude(density), True, normalize, lam)
        assert torch.equal(out, want), (normalize, lam)
    # exact: ties at the threshold go to the lowest index, so on these tied magnitudes the masks differ
    ex, _ = run_kernel("ties", base, xs, per_model={"weight": w, "density": density}, weighted_election=True)
    assert not torch.equal(ex, out)


def test_ties_mergekit_trim_keeps_at_least_one_and_ties_by_sort():
    from merge_cli.methods.ties import trim, trim_sorted

    delta = t([0.5, -2.0, 2.0, 1.0, 2.0])
    # density 0.1 of 5: int(0.5) = 0 entries; mergekit keeps max(1, 0) = 1, the exact path none
    assert torch.count_nonzero(trim_sorted(delta.clone(), 0.1)) == 1
    assert torch.count_nonzero(trim(delta.clone(), 0.1)) == 0
    # two of the three |2| entries: lowest index first (exact), torch's argsort order (mergekit)
    assert trim(delta.clone(), 0.4).tolist() == [0.0, -2.0, 2.0, 0.0, 0.0]
    order = torch.argsort(delta.abs(), descending=True)[:2]
    assert torch.equal(
        trim_sorted(delta.clone(), 0.4) != 0, torch.zeros(5, dtype=torch.bool).index_fill_(0, order, True)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_mergekit_is_mergekits_arithmetic_bitwise(method, dtype):
    base, xs = _quantised(dtype, seed=13)
    density, gamma, w = [0.6, 0.8, 0.5], [0.05, 0.01, 0.02], [0.5, 0.5, 0.3]
    out, _ = run_kernel(
        method, base, xs, per_model={"weight": w, "density": density, "gamma": gamma},
        granularity="tensor", numerics="mergekit",
    )  # fmt: skip
    want = _mk_gta(base, xs, w, _mk_outliers(density, gamma), method.endswith("_ties"), False)
    assert torch.equal(out, want)


def test_blocked_ties_steps_aside_only_when_the_sort_would_choose():
    from merge_cli.kernels import dispatch as fused_methods

    g = torch.Generator().manual_seed(14)
    base = (torch.randn(50, 40, generator=g) * 1024).round() / 1024
    smooth = [base + 0.05 * torch.randn(50, 40, generator=g) for _ in range(2)]  # no tied magnitudes
    tied = [base + torch.randint(-8, 9, (50, 40), generator=g) / 64 for _ in range(2)]  # exact deltas k/64
    pm = {"weight": [0.6, 0.4], "density": [0.5, 0.3]}
    for xs, blocked in ((smooth, True), (tied, False)):
        p = params_for("ties", 2, pm, numerics="mergekit", weighted_election=True)
        want, _ = run_kernel("ties", base, xs, per_model=pm, numerics="mergekit", weighted_election=True)
        got = fused_methods.whole("ties", base, xs, [0.6, 0.4], p, torch.float32, {})
        assert (got is not None) == blocked
        if got is not None:
            assert torch.equal(got, want)
    assert not fused_methods.applies(
        "breadcrumbs", params_for("breadcrumbs", 2, granularity="tensor", numerics="mergekit")
    )
    assert fused_methods.applies("breadcrumbs", params_for("breadcrumbs", 2, granularity="tensor"))


# ------------------------------------------------------------------------------------------ model_stock
def _mk_model_stock(base, xs):
    """mergekit's model_stock (not filter-wise), one op per step in the inputs' dtype."""
    b = base.reshape(-1)
    offs = [x.reshape(-1) - b for x in xs]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            nprod = torch.norm(offs[i], dim=-1) * torch.norm(offs[j], dim=-1)
            cos.append(((offs[i] * offs[j]).sum(dim=-1) / nprod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(xs)
    tt = (k * c) / (1 + (k - 1) * c)
    avg = sum(x.reshape(-1) for x in xs) / k
    return (tt * avg + (1 - tt) * b).reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_stock_mergekit_is_mergekits_arithmetic_bitwise(dtype):
    g = torch.Generator().manual_seed(15)
    base = torch.randn(60, 50, generator=g)
    common = 0.05 * torch.randn(60, 50, generator=g)
    xs = [(base + common + 0.05 * torch.randn(60, 50, generator=g)).to(dtype) for _ in range(3)]
    base = base.to(dtype)
    mk, stats = run_kernel("model_stock", base, xs, numerics="mergekit", clamp_cos=False)
    assert mk.dtype == dtype and torch.equal(mk, _mk_model_stock(base, xs))
    ex, ex_stats = run_kernel("model_stock", base, xs, clamp_cos=False)
    assert stats["t"] == pytest.approx(ex_stats["t"], rel=1e-2 if dtype == torch.bfloat16 else 1e-5)
    if dtype == torch.bfloat16:  # the models' running sum in bf16 against the fp32-accumulated mean
        assert not torch.equal(mk, ex)


def test_model_stock_mergekit_hand_computed():
    # task vectors [1, 0] and [1, 1]: cos = 1/sqrt(2), t = 2c / (1 + c); mean of the models [1, 0.5]
    base = t([0.0, 0.0])
    c = 1 / math.sqrt(2)
    tt = 2 * c / (1 + c)
    out, _ = run_kernel(
        "model_stock", base, [t([1.0, 0.0]), t([1.0, 1.0])], numerics="mergekit", clamp_cos=False
    )
    torch.testing.assert_close(out, t([tt, tt * 0.5]), rtol=4e-7, atol=0)


# ---------------------------------------------------------------------------------------------- nuslerp
def _mk_nuslerp(tt, v0, v1, dim=-1, flatten=True):
    """mergekit's nuslerp, one op per step in the inputs' dtype."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    c = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - c.square()) <= 1e-8**2
    th = torch.acos(torch.where(colinear, 0, c))
    res = (torch.sin((1 - tt) * th) * v0 + torch.sin(tt * th) * v1) / torch.sin(th)
    res = torch.where(colinear, (1 - tt) * v0 + tt * v1, res)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_mergekit_is_mergekits_arithmetic_bitwise(dtype, flatten, row_wise):
    g = torch.Generator().manual_seed(16)
    base = torch.randn(30, 20, generator=g).to(dtype)
    xs = [(base.float() + 0.1 * torch.randn(30, 20, generator=g)).to(dtype) for _ in range(2)]
    kw = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out, _ = run_kernel("nuslerp", base, xs, per_model={"weight": [0.3, 0.7]}, numerics="mergekit", **kw)
    want = base + _mk_nuslerp(0.7, xs[0] - base, xs[1] - base, dim=0 if row_wise else -1, flatten=flatten)
    assert out.dtype == dtype and torch.equal(out, want)


def test_nuslerp_mergekit_lerps_only_colinear_vectors():
    a = t([1.0, 0.0])
    near = t([1.0, 0.02])  # cos ~ 0.9998 > 0.9995: the exact path lerps, mergekit's slerps
    mk, _ = run_kernel("nuslerp", None, [a, near], numerics="mergekit")
    ex, _ = run_kernel("nuslerp", None, [a, near])
    torch.testing.assert_close(ex, t([1.0, 0.01]), rtol=0, atol=1e-7)  # (a + near) / 2
    theta = math.atan(0.02)
    s = math.sin(0.5 * theta) / math.sin(theta)  # both unit-ish: slerp = s * (a + near)
    torch.testing.assert_close(mk, t([2 * s, 0.02 * s]), rtol=1e-6, atol=0)
    assert not torch.equal(mk, ex)
    out, _ = run_kernel("nuslerp", None, [a, 2 * a], numerics="mergekit")  # colinear: lerp
    assert out.tolist() == [1.5, 0.0]


# -------------------------------------------------------------------------------------------------- sce
def _mk_sce(base, xs, select_topk):
    """mergekit's sce, one op per step in the inputs' dtype."""
    tv = torch.stack([x - base for x in xs], dim=0)
    if select_topk < 1:
        var = torch.var(tv, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        if k:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tv = tv * mask.unsqueeze(0)
    majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    erase = tv.sign() == majority
    w = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    w = w / torch.sum(w).item()
    ew = w.reshape(-1, *([1] * base.dim())) * erase
    return base + (tv * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select_topk", [1.0, 0.5])
def test_sce_mergekit_is_mergekits_arithmetic_bitwise(dtype, select_topk):
    base, xs = _quantised(dtype, seed=17)
    out, stats = run_kernel("sce", base, xs, numerics="mergekit", select_topk=select_topk)
    assert out.dtype == dtype and torch.equal(out, _mk_sce(base, xs, select_topk))
    ex, ex_stats = run_kernel("sce", base, xs, select_topk=select_topk)
    if select_topk == 1.0:  # the same entries: weights agree to the compute dtype's rounding
        rel = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert stats["weights"] == pytest.approx(ex_stats["weights"], rel=rel)
    else:  # tied variances at the top-k threshold: torch.topk's choice is not the lowest index
        assert not torch.equal(out, ex)
