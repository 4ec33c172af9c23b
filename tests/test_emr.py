"""EMR-Merging end to end: unified output, per-task bit-packed masks and rescalers, emr-materialize;
compared with a plain EMR written here (METHODS.md §18) and the §19 invariants."""

import json

import pytest
import torch
from helpers import load_output, run_cli, write_recipe
from safetensors.torch import load_file


def _state(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def plain_emr(base, experts, keys):
    uni, masks, num, den = {}, [{} for _ in experts], [0.0] * len(experts), [0.0] * len(experts)
    for k in keys:
        taus = [e[k].float() - base[k].float() for e in experts]
        total = sum(taus)
        gamma = torch.where(total > 0, 1.0, -1.0)
        ms = [t * gamma > 0 for t in taus]
        mag = torch.zeros_like(total)
        for t, m in zip(taus, ms):
            mag = torch.maximum(mag, (t * m).abs())
        uni[k] = gamma * mag
        for i, (t, m) in enumerate(zip(taus, ms)):
            masks[i][k] = m
            num[i] += float(t.abs().double().mean())
            den[i] += float((m * uni[k]).abs().double().mean())
    return uni, masks, [n / d for n, d in zip(num, den)]


def _unpack(packed, shape):
    bits = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    return bits[: torch.Size(shape).numel()].bool().reshape(shape)


def _run(family, tmp_path, n, budget=None):
    recipe = write_recipe(tmp_path / f"emr{n}.yaml", {
        "base_model": str(family["base"]),
        "models": [{"model": str(family[f"expert{i}"])} for i in range(n)],
        "method": "emr", "overrides": [{"match": "lm_head", "method": "linear"}],
        "dtype": "float32", "out_dtype": "float32",
    })  # fmt: skip
    out = tmp_path / f"out{n}"
    res = run_cli("run", recipe, out, "--quiet", *(["--max-memory", budget] if budget else []))
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("budget", [None, "64KB"])  # 64KB: the mask pass and the merge over row pieces
def test_emr_outputs_masks_rescalers_and_task_models(family, tmp_path, budget):
    out = _run(family, tmp_path, 3, budget)
    base = _state(family["base"])
    experts = [_state(family[f"expert{i}"]) for i in range(3)]
    keys = sorted(k for k in base if "lm_head" not in k)
    uni, masks, lams = plain_emr(base, experts, keys)
    got = load_output(out)
    for k in keys:
        assert torch.allclose(got[k], base[k] + uni[k], atol=1e-7), k
    meta = json.loads((out / "emr" / "emr.json").read_text())
    for i, t in enumerate(meta["tasks"]):
        assert abs(t["rescaler"] - lams[i]) < 1e-9 * max(1.0, lams[i])
        packed = load_file(str(out / t["mask_file"]))
        assert sorted(packed) == keys
        for k in keys:
            m = _unpack(packed[k], base[k].shape)
            assert torch.equal(m, masks[i][k]), k
            assert (
                torch.sign(experts[i][k] - base[k])[m] == torch.sign(uni[k])[m]
            ).all()  # masks agree with sign(tau_uni)
    res = run_cli("emr-materialize", out, 1, tmp_path / "task1")
    assert res.exit_code == 0, res.output
    task1 = load_output(tmp_path / "task1")
    for k in keys:
        want = base[k] + lams[1] * masks[1][k] * uni[k]
        assert torch.allclose(task1[k], want, atol=1e-6), k
    assert torch.equal(task1["lm_head.weight"], got["lm_head.weight"])  # not merged by EMR: copied
    assert run_cli("emr-materialize", out, 7, tmp_path / "bad").exit_code == 2


def test_emr_single_model_gives_that_model(family, tmp_path):
    out = _run(family, tmp_path, 1)
    base, one = _state(family["base"]), _state(family["expert0"])
    assert json.loads((out / "emr" / "emr.json").read_text())["tasks"][0]["rescaler"] == 1.0
    assert run_cli("emr-materialize", out, 0, tmp_path / "t0").exit_code == 0
    for sd in (load_output(out), load_output(tmp_path / "t0")):
        for k in base:
            if "lm_head" not in k:
                assert torch.allclose(sd[k], one[k], atol=1e-6), k


def test_emr_chunked_kernel_and_bit_packing_match_whole_tensor(monkeypatch):
    from merge_cli.methods import ParamSet, TensorCtx
    from merge_cli.methods import emr as emr_mod

    g = torch.Generator().manual_seed(2)
    base = torch.randn(10, 13, generator=g)
    xs = [base + torch.randn(10, 13, generator=g) for _ in range(3)]
    _, masks, tau_uni = emr_mod.unify(base, xs)
    monkeypatch.setattr(emr_mod, "step_elements", lambda n_rows, itemsize: 16)
    out = emr_mod.emr(base, xs, [1.0] * 3, ParamSet({}), TensorCtx(name="t"))
    assert torch.equal(out, base + tau_uni)
    m = masks[0].reshape(-1)
    pieces = torch.cat([emr_mod.pack_bits(m[s : s + 16]) for s in range(0, m.numel(), 16)])
    assert torch.equal(pieces, emr_mod.pack_bits(m))
    assert torch.equal(_unpack(pieces, m.shape), m)
