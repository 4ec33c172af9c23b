"""PCB-Merging and the exact streamed statistics passes: the streamed whole-model merge equals a plain
in-memory implementation of METHODS.md §7 written here (sorts over the concatenated model), plus §19."""

import pytest
import torch
from helpers import load_output, run_cli, write_recipe
from safetensors.torch import load_file

from merge_cli.methods import METHODS, ParamSet, TensorCtx
from merge_cli.methods.wholemodel import RadixSelect


def _state(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# -- exact streamed selection ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["normal", "ties", "abs", "tiny"])
def test_radix_select_equals_sort(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50_000, generator=g)
    if kind == "ties":
        x = torch.round(x * 4) / 4  # many exact ties, negative values and zeros
    if kind == "abs":
        x = x.abs() * 1e-4
    if kind == "tiny":
        x = torch.tensor([3.0, -1.0, -0.0, 0.0, 2.5])
    ranks = [1, 2, x.numel() // 3 + 1, x.numel()]
    sel = RadixSelect(ranks, nonneg=kind == "abs")
    pieces = torch.split(x, 777)
    for _ in range(2):
        for p in pieces:
            sel.add(p)
        sel.advance()
    want = torch.sort(x).values
    assert sel.values == [float(want[r - 1]) for r in ranks]


# -- an independent whole-model PCB ------------------------------------------------------------------
def plain_pcb(base_sd, expert_sds, weights, r, q, inter, keys):
    """METHODS.md §7 literally: stack whole flattened task vectors, sort rows, clip, balance, drop, fuse."""
    flat = [torch.cat([sd[k].flatten() for k in keys]) for sd in [base_sd, *expert_sds]]
    T = torch.stack([f - flat[0] for f in flat[1:]])
    n, d = T.shape
    srt = torch.sort(T.abs(), dim=1).values
    lo = srt[:, int(d * q)].unsqueeze(1)
    hi = srt[:, int(d * (1 - q)) - 1].unsqueeze(1)
    A = torch.clamp(T.abs(), min=lo, max=hi)
    mm = (A - A.min(1, keepdim=True).values) / (A.max(1, keepdim=True).values - A.min(1, keepdim=True).values)
    intra = torch.exp(n * mm**2)
    if inter == "sum_raw":
        inter_s = torch.tanh(T * T.sum(0))
    else:
        tn = torch.sign(T) * mm
        inter_s = torch.stack([sum(torch.tanh(tn[i] * tn[j]) for j in range(n)) for i in range(n)])
    B = intra * inter_s
    c = torch.sort(B, dim=1).values[:, int(d * (1 - r))].unsqueeze(1)
    Bp = torch.maximum(B, c)
    W = (Bp - Bp.min(1, keepdim=True).values) / (
        Bp.max(1, keepdim=True).values - Bp.min(1, keepdim=True).values
    )
    lam = torch.tensor(weights).unsqueeze(1)
    merged = flat[0] + (lam * torch.sign(T) * A * W).sum(0) / W.sum(0).clamp(min=1e-12)
    out, pos = {}, 0
    for k in keys:
        m = base_sd[k].numel()
        out[k] = merged[pos : pos + m].reshape(base_sd[k].shape)
        pos += m
    return out, W > 0


@pytest.mark.parametrize("budget", [None, "64KB"])  # 64KB: statistics and merge over small row pieces
@pytest.mark.parametrize("inter", ["sum_raw", "pairwise_norm"])
def test_streamed_whole_model_pcb_equals_in_memory(family, tmp_path, inter, budget):
    weights = [1.0, 0.7, 1.3]
    recipe = write_recipe(tmp_path / "pcb.yaml", {
        "base_model": str(family["base"]),
        "models": [{"model": str(family[f"expert{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "method": "pcb",
        "parameters": {"density": 0.2, "clamp_quantile": 0.05, "inter": inter},
        "overrides": [{"match": "norm", "method": "linear"}],  # norms left out of the whole-model row
        "dtype": "float32", "out_dtype": "float32",
    })  # fmt: skip
    res = run_cli("run", recipe, tmp_path / "out", "--quiet", *(["--max-memory", budget] if budget else []))
    assert res.exit_code == 0, res.output
    base = _state(family["base"])
    experts = [_state(family[f"expert{i}"]) for i in range(3)]
    keys = sorted(k for k in base if "norm" not in k)
    want, kept = plain_pcb(base, experts, weights, 0.2, 0.05, inter, keys)
    got = load_output(tmp_path / "out")
    d = kept.shape[1]
    # identical kept masks: W > 0 exactly where the plain implementation keeps a coordinate
    got_tau = torch.cat([(got[k] - base[k]).flatten() for k in keys])
    want_tau = torch.cat([(want[k] - base[k]).flatten() for k in keys])
    assert torch.equal(got_tau != 0, want_tau != 0)
    assert torch.allclose(got_tau, want_tau, rtol=1e-5, atol=1e-7)
    # about r*d coordinates kept per task row (ties at the cut are dropped)
    assert all(abs(int(k.sum()) - 0.2 * d) <= 2 for k in kept)
    import json

    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(report["engine"]["stats_passes"]) == 4
    assert report["engine"]["whole_model"]["pcb"]["elements_per_task"] == d


# -- §19 invariants on the kernel (granularity: tensor makes one tensor the whole row) ----------------
def _p(n, **kw):
    values = {
        "weight": (1.0,) * n,
        "density": 0.3,
        "clamp_quantile": 0.1,
        "inter": "sum_raw",
        "granularity": "tensor",
    }
    values.update(kw)
    return ParamSet(values)


def _run(base, xs, **kw):
    p = _p(len(xs), **kw)
    return METHODS["pcb"].kernel(base, xs, list(p.weight), p, TensorCtx(name="t"))


def test_pcb_identical_inputs_give_clipped_dropped_task_vector():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 25, generator=g)
    tau = torch.randn(40, 25, generator=g) * 0.01
    out = _run(base, [base + tau, base + tau], density=0.3, clamp_quantile=0.1)
    flat = tau.flatten().abs()
    srt = torch.sort(flat).values
    d = flat.numel()
    lo, hi = srt[int(d * 0.1)], srt[int(d * 0.9) - 1]
    tc = torch.sign(tau) * tau.abs().clamp(lo, hi)
    got = out - base
    kept = got != 0
    assert abs(int(kept.sum()) - int(0.3 * d)) <= 1
    assert torch.allclose(got[kept], tc[kept], atol=1e-6)  # theta0 + Tc * 1[W > 0] (weights sum to 1)


def test_pcb_permutation_invariant_and_finite_on_zero_task_vectors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 20, generator=g)
    xs = [base + 0.01 * torch.randn(30, 20, generator=g) for _ in range(3)]
    a = _run(base, xs, weight=(1.0, 0.5, 2.0))
    b = _run(base, xs[::-1], weight=(2.0, 0.5, 1.0))
    assert torch.allclose(a, b, atol=1e-6)
    zero = _run(base, [base.clone(), base.clone()])
    assert torch.equal(zero, base)
    mixed = _run(base, [base.clone(), xs[0]])
    assert torch.isfinite(mixed).all()


def test_pcb_plan_rejects_per_layer_density_at_model_granularity(family, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", {
        "base_model": str(family["base"]),
        "models": [{"model": str(family["expert0"])}, {"model": str(family["expert1"])}],
        "method": "pcb", "parameters": {"density": [0.1, 0.3]},
    })  # fmt: skip
    res = run_cli("plan", recipe)
    assert res.exit_code == 2
    assert "whole model" in res.stderr


def test_pcb_weights_in_unit_interval_and_invariant_to_scaling_a_row_of_b():
    from merge_cli.methods.pcb import fuse

    g = torch.Generator().manual_seed(4)
    B = torch.randn(3, 200, generator=g)
    Tc = torch.randn(3, 200, generator=g)
    lam = torch.ones(3, 1)
    c = torch.kthvalue(B, 150, dim=1, keepdim=True).values
    bmax = B.amax(dim=1, keepdim=True)
    merged, W = fuse(Tc, B, c, bmax, lam)
    assert W.min() >= 0 and W.max() <= 1 and torch.equal(W.amax(dim=1), torch.ones(3))
    assert (W > 0).sum(dim=1).tolist() == [50, 50, 50]  # everything at or below the cut is exactly 0
    s = torch.tensor([[1.0], [7.5], [0.2]])  # positive scaling of rows of B (and so of c and max B)
    merged2, W2 = fuse(Tc, B * s, c * s, bmax * s, lam)
    assert torch.allclose(W2, W, atol=1e-6) and torch.allclose(merged2, merged, atol=1e-5)
