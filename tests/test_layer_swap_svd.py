"""layer_swap (bitwise layers, end to end) and the SVD methods tsv, iso_c, iso_cts: METHODS.md §19
invariants and an independent implementation (polar factor via eigh: U (U^T U)^-1/2)."""

import itertools

import pytest
import torch
from helpers import load_output, run_cli, write_recipe
from safetensors.torch import load_file

from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.methods.iso_cts import space_sizes
from merge_cli.methods.tsv import polar


def _state(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# -- layer_swap ------------------------------------------------------------------------------------
def _swap(family, tmp_path, name, **params):
    recipe = write_recipe(tmp_path / f"{name}.yaml", {
        "base_model": str(family["base"]), "models": [{"model": str(family["expert0"])}],
        "method": "layer_swap", "parameters": params,
    })  # fmt: skip
    res = run_cli("run", recipe, tmp_path / name, "--quiet")
    assert res.exit_code == 0, res.output
    return load_output(tmp_path / name)


def _layer(name):
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def test_layer_swap_bitwise_layers_and_transitions(family_bf16, tmp_path):
    task, lang = _state(family_bf16["base"]), _state(family_bf16["expert0"])
    none = _swap(family_bf16, tmp_path, "none", bottom=0, top=0, transition_bottom=0, transition_top=0)
    assert all(torch.equal(none[k], task[k]) for k in task)  # b = u = tb = tu = 0 -> theta_T
    full = _swap(
        family_bf16,
        tmp_path,
        "all",
        bottom=4,
        top=0,
        transition_bottom=0,
        transition_top=0,
        non_layer="donor",
    )
    assert all(
        torch.equal(full[k], lang[k]) for k in lang
    )  # every layer + non-layer from the donor -> theta_L
    # 4 layers: 0 donor, 1 transition (w = 0.25), 2 task, 3 donor; non-layer tensors averaged
    mix = _swap(family_bf16, tmp_path, "mix", bottom=1, transition_bottom=1, transition_top=0, top=1,
                transition_weight=0.25, non_layer="average")  # fmt: skip
    for k, v in mix.items():
        layer = _layer(k)
        if layer in (0, 3):
            assert torch.equal(v, lang[k]), k
        elif layer == 2:
            assert torch.equal(v, task[k]), k
        else:
            w = 0.25 if layer == 1 else 0.5
            want = (w * lang[k].float() + (1 - w) * task[k].float()).to(torch.bfloat16)
            assert torch.equal(v, want), k


def test_layer_swap_too_many_layers_is_a_plan_error(family, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", {
        "base_model": str(family["base"]), "models": [{"model": str(family["expert0"])}],
        "method": "layer_swap", "parameters": {"bottom": 3, "top": 2},
    })  # fmt: skip
    res = run_cli("plan", recipe)
    assert res.exit_code == 2 and "4 layers" in res.stderr


# -- SVD methods -----------------------------------------------------------------------------------
def _run(method, base, xs, weights=None, **kw):
    spec = METHODS[method]
    values = {n: getattr(spec.params(), n) for n in spec.params.model_fields}
    values["weight"] = tuple(weights or [1.0] * len(xs))
    values.update(kw)
    return spec.kernel(base, xs, list(values["weight"]), ParamSet(values), TensorCtx(name="t"))


def _family(n=3, shape=(12, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + 0.1 * torch.randn(*shape, generator=g) for _ in range(n)]


def eigh_polar(x):
    """Independent polar factor: x (x^T x)^(-1/2) via a symmetric eigendecomposition (x of full column rank)."""
    evals, evecs = torch.linalg.eigh(x.double().T @ x.double())
    return (x.double() @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T).float()


def test_tsv_equals_independent_implementation():
    base, xs = _family(3, (12, 9))
    k = 9 // 3
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = torch.linalg.svd(x - base)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    U, V = eigh_polar(torch.cat(us, 1)), eigh_polar(torch.cat(vs, 1))
    want = base + 0.7 * U @ torch.diag(torch.cat(ss)) @ V.T
    assert torch.allclose(_run("tsv", base, xs, alpha=0.7), want, atol=1e-5)


def test_tsv_invariants():
    base, xs = _family(1, (10, 7))
    assert torch.allclose(_run("tsv", base, xs), xs[0], atol=1e-5)  # T = 1, alpha = 1 -> theta_1
    base, xs = _family(3, (10, 7), seed=1)
    p = polar(torch.randn(10, 6))
    assert torch.allclose(p.T @ p, torch.eye(6), atol=1e-5)  # orthonormal columns
    ref = _run("tsv", base, xs)
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(_run("tsv", base, [xs[i] for i in perm]), ref, atol=1e-5)
    b1, x1 = torch.zeros(5), [torch.arange(5.0), 3 * torch.arange(5.0)]
    assert torch.equal(_run("tsv", b1, x1), 2 * torch.arange(5.0))  # 1-D keys: mean of tau


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_flat_spectrum_and_invariants(method):
    base, xs = _family(3, (12, 8), seed=2)
    delta = _run(method, base, xs) - base
    sv = torch.linalg.svdvals(delta)
    assert torch.allclose(sv, sv.mean().expand_as(sv), rtol=1e-4)  # every singular value equal
    m_sv = torch.linalg.svdvals(sum(x - base for x in xs))
    if method == "iso_c":
        assert torch.allclose(sv, m_sv.mean().expand_as(sv), rtol=1e-4)
        assert torch.allclose(sv.sum(), m_sv.sum(), rtol=1e-4)  # nuclear norm kept
    two = _run(method, base, xs, alpha=2.0) - base
    assert torch.allclose(two, 2 * delta, atol=1e-5)  # linear in alpha
    perm = _run(method, base, xs[::-1]) - base
    assert torch.allclose(perm, delta, atol=1e-4)
    zero = _run(method, base, [base.clone(), base.clone()])
    assert torch.equal(zero, base)  # zero task vectors: no NaN, no update


def test_iso_cts_spaces_and_full_common_space_is_iso_c():
    assert space_sizes(8, 3, 0.8) == (8 - 3 * 0, 0)
    assert space_sizes(100, 3, 0.8) == (100 - 3 * 6, 6)
    base, xs = _family(2, (9, 6), seed=3)
    assert torch.allclose(
        _run("iso_cts", base, xs, common_space_fraction=1.0), _run("iso_c", base, xs), atol=1e-5
    )


@pytest.mark.parametrize("method", ["tsv", "iso_cts"])
def test_svd_methods_run_end_to_end(family, tmp_path, method):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "base_model": str(family["base"]),
        "models": [{"model": str(family[f"expert{i}"])} for i in range(3)],
        "method": method, "out_dtype": "float32",
    })  # fmt: skip
    assert run_cli("run", recipe, tmp_path / "out", "--quiet").exit_code == 0
    got, base = load_output(tmp_path / "out"), _state(family["base"])
    experts = [_state(family[f"expert{i}"]) for i in range(3)]
    for k, v in got.items():
        assert v.shape == base[k].shape and torch.isfinite(v).all()
        if v.dim() == 1:
            assert torch.allclose(v, base[k] + sum(e[k] - base[k] for e in experts) / 3, atol=1e-6)
