"""The SVD of tsv / iso_c / iso_cts: fp32 first, then the documented fallbacks when LAPACK / cuSOLVER fails
to converge (fp32 gesvd on CUDA, fp64, fp64 through QR), each result checked against its definition
(reconstruction, orthonormal factors, singular values from an fp64 eigendecomposition of x^T x); and the
kernels' memory-lean mode (ctx.owns_inputs) gives bitwise the result of the plain mode."""

import pytest
import torch

from merge_cli.errors import MergeCliError
from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.methods import tsv as tsv_mod

REAL_SVD = torch.linalg.svd


def _check_svd(x, u, s, vh):
    r = min(x.shape)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert u.shape == (x.shape[0], r) and s.shape == (r,) and vh.shape == (r, x.shape[1])
    assert torch.allclose(u @ torch.diag(s) @ vh, x, atol=1e-4)
    assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-4) and torch.allclose(
        vh @ vh.T, torch.eye(r), atol=1e-4
    )
    x64 = x.double()
    gram = x64.T @ x64 if x.shape[0] >= x.shape[1] else x64 @ x64.T
    want = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)  # descending, like the SVD
    assert torch.allclose(s.double(), want, atol=1e-4)


def _failing(when, calls):
    """torch.linalg.svd that raises LinAlgError (or returns NaNs) on the inputs `when` selects."""

    def fake(a, *args, **kw):
        calls.append((a.dtype, tuple(a.shape), kw.get("driver")))
        verdict = when(a, kw)
        if verdict == "raise":
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        u, s, vh = REAL_SVD(a, *args, **kw)
        return (u * float("nan"), s, vh) if verdict == "nan" else (u, s, vh)

    return fake


@pytest.mark.parametrize("shape", [(60, 20), (20, 60)])
def test_fp32_failure_retries_in_fp64(monkeypatch, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(
        torch.linalg, "svd", _failing(lambda a, kw: "raise" if a.dtype == torch.float32 else "ok", calls)
    )
    stats = {}
    _check_svd(x, *tsv_mod.svd(x, stats))
    assert stats["svd_fallback"] == ["fp64"] and [c[0] for c in calls] == [torch.float32, torch.float64]


@pytest.mark.parametrize("shape", [(60, 20), (20, 60)])
def test_fp64_failure_goes_through_qr(monkeypatch, shape):
    """Only the small square R of the QR path converges here."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    calls = []
    monkeypatch.setattr(
        torch.linalg, "svd", _failing(lambda a, kw: "ok" if a.shape[0] == a.shape[1] else "raise", calls)
    )
    stats = {}
    _check_svd(x, *tsv_mod.svd(x, stats))
    assert stats["svd_fallback"] == ["fp64 via QR"]
    assert calls[-1] == (torch.float64, (20, 20), None)


def test_non_finite_result_counts_as_a_failure_and_no_fallback_when_fp32_converges(monkeypatch):
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(2))
    stats = {}
    _check_svd(x, *tsv_mod.svd(x, stats))
    assert stats == {}  # converged in fp32: nothing recorded
    calls = []
    monkeypatch.setattr(
        torch.linalg, "svd", _failing(lambda a, kw: "nan" if a.dtype == torch.float32 else "ok", calls)
    )
    _check_svd(x, *tsv_mod.svd(x, stats))
    assert stats["svd_fallback"] == ["fp64"]


def test_every_attempt_failing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.linalg, "svd", _failing(lambda a, kw: "raise", []))
    with pytest.raises(
        MergeCliError, match=r"SVD of model.layers.0.mlp.up_proj.weight \(\[8, 4\]\) did not converge"
    ):
        tsv_mod.svd(torch.ones(8, 4), {}, "model.layers.0.mlp.up_proj.weight")


def test_cuda_attempts_use_cusolver_gesvd_before_fp64(monkeypatch):
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    tries = tsv_mod.svd_attempts(x, cuda=True)
    assert [label for label, _ in tries] == ["fp32", "fp32 gesvd", "fp64", "fp64 via QR"]
    assert [label for label, _ in tsv_mod.svd_attempts(x)] == ["fp32", "fp64", "fp64 via QR"]
    calls = []
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *args, **kw: calls.append((a.dtype, kw.get("driver"))))
    for _, attempt in tries[:3]:
        attempt()
    assert calls == [(torch.float32, None), (torch.float32, "gesvd"), (torch.float64, "gesvd")]


@pytest.mark.gpu
def test_cuda_fp32_failure_falls_back_to_gesvd(monkeypatch):
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(4)).cuda()
    calls = []
    monkeypatch.setattr(
        torch.linalg, "svd", _failing(lambda a, kw: "raise" if kw.get("driver") is None else "ok", calls)
    )
    stats = {}
    u, s, vh = tsv_mod.svd(x, stats)
    assert stats["svd_fallback"] == ["fp32 gesvd"] and u.is_cuda
    _check_svd(x.cpu(), u.cpu(), s.cpu(), vh.cpu())


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (33,)])
def test_owning_the_inputs_changes_memory_not_the_result(method, shape):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(*shape, generator=g)
    xs = [base + 0.05 * torch.randn(*shape, generator=g) for _ in range(3)]
    w = (1.0, 0.5, 1.5)
    p = ParamSet({"weight": w, "alpha": 1.2, "common_space_fraction": 0.8})
    if method != "iso_cts":
        p = ParamSet({"weight": w, "alpha": 1.2})
    plain = METHODS[method].kernel(base, xs, list(w), p, TensorCtx(name="t"))
    owned_xs, base_copy = [x.clone() for x in xs], base.clone()
    owned = METHODS[method].kernel(base, owned_xs, list(w), p, TensorCtx(name="t", owns_inputs=True))
    assert torch.equal(owned, plain)
    assert torch.equal(base, base_copy)  # the base is never modified
    assert owned_xs == [None, None, None]  # every input released
