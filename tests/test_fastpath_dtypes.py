"""The fast path in every compute dtype: a recipe with `dtype: bfloat16` or `float16` runs the hot methods
on the native kernels (linear on the eager blocked kernel), whole and in row chunks, with the same bits as
the plain kernels (--fused off); where a merge stays on the plain kernels, the report says why."""

from __future__ import annotations

import pytest
import torch
from helpers import chunked_family, merge_in_process, run_cli, write_recipe

from merge_cli.kernels import native

needs_native = pytest.mark.skipif(
    native.lib() is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
EMB = "model.embed_tokens.weight"


def _models(tmp_path, dtype=torch.bfloat16):
    return chunked_family(tmp_path, dtype, seed=21)


def _recipe(tmp_path, m, method: str, params: str, top: str, dtype: str, out_dtype: str = "bfloat16"):
    """mergekit format (what model cards use): `dtype` is the compute dtype."""
    base = f"base_model: {m['base']}\n" if method != "linear" else ""
    models = "".join(
        f"  - model: {m[e]}\n    parameters: {{weight: {w}{', ' + params if params else ''}}}\n"
        for e, w in (("e0", 0.6), ("e1", 1.1), ("e2", 0.3))
    )
    return write_recipe(
        tmp_path / "r.yaml",
        f"merge_method: {method}\n{base}models:\n{models}parameters: {top}\n"
        f"dtype: {dtype}\nout_dtype: {out_dtype}\n",
    )


CASES = [
    ("linear", "", "{normalize: true}"),
    ("task_arithmetic", "", "{lambda: 0.8}"),
    ("task_arithmetic", "", "{normalize: true}"),
    ("ties", "density: 0.3", "{normalize: true}"),
    ("ties", "density: 0.6", "{normalize: false, lambda: 1.2}"),
    ("dare_ties", "density: 0.4", "{}"),
    ("dare_linear", "density: 0.5", "{normalize: true}"),
    ("dare_linear", "density: 0.5", "{rescale: false}"),
    ("breadcrumbs_ties", "density: 0.8, gamma: 0.05", "{}"),
    ("breadcrumbs", "density: 0.8, gamma: 0.05", "{}"),
]


@needs_native
@pytest.mark.parametrize("method,params,top", CASES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_compute_runs_native_with_the_plain_bits(tmp_path, method, params, top, dtype):
    if dtype == "float16" and not native.has_f16():
        pytest.skip("the C compiler has no _Float16")
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, method, params, top, dtype)
    ref, plain = merge_in_process(tmp_path, recipe, "plain", max_memory=1 << 30, fused="off")
    assert plain.engine.kernels.startswith("plain")
    for label, budget in (("whole", 1 << 30), ("chunked", 600_000)):
        got, res = merge_in_process(tmp_path, recipe, label, max_memory=budget)
        assert res.engine.kernels == "native", res.engine.kernels
        assert (EMB in res.engine.chunked) == (label == "chunked")
        for name in ref:
            assert torch.equal(ref[name].view(torch.int16), got[name].view(torch.int16)), (label, name)


@needs_native
def test_fp32_inputs_with_bf16_compute_and_fp32_output(tmp_path):
    """Inputs in fp32 are rounded to the compute dtype as they are read; the output widened to fp32."""
    m = _models(tmp_path, torch.float32)
    recipe = _recipe(tmp_path, m, "ties", "density: 0.3", "{}", "bfloat16", "float32")
    ref, _ = merge_in_process(tmp_path, recipe, "plain", fused="off")
    got, res = merge_in_process(tmp_path, recipe, "native", max_memory=600_000)
    assert res.engine.kernels == "native"
    for name in ref:
        assert torch.equal(ref[name].view(torch.int32), got[name].view(torch.int32)), name


def test_plain_kernels_say_why(tmp_path, monkeypatch):
    """One line in the report (and the summary line): which kernels ran and why the plain ones did."""
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, "multislerp", "", "{}", "bfloat16")
    _, res = merge_in_process(tmp_path, recipe, "multislerp")
    assert res.engine.kernels == "plain kernels: multislerp has no fast path"
    assert res.report["engine"]["kernels"] == res.engine.kernels
    recipe = _recipe(tmp_path, m, "ties", "density: 0.3", "{}", "bfloat16")
    _, res = merge_in_process(tmp_path, recipe, "off", fused="off")
    assert res.engine.kernels == "plain kernels: --fused off"
    monkeypatch.setattr(native, "lib", lambda: None)
    monkeypatch.setattr(native, "_why", ["no C compiler found (set CC)"])
    _, res = merge_in_process(tmp_path, recipe, "nocc")
    assert res.engine.kernels == (
        "plain kernels: bf16 compute needs the native kernels (no C compiler found (set CC))"
    )
    recipe = _recipe(tmp_path, m, "linear", "", "{}", "bfloat16")
    _, res = merge_in_process(tmp_path, recipe, "linear_nocc")
    assert res.engine.kernels.startswith("eager blocked")
    r = run_cli("run", _recipe(tmp_path, m, "multislerp", "", "{}", "bfloat16"), tmp_path / "cli", "-q")
    assert r.exit_code == 0, r.stderr
    assert "plain kernels: multislerp has no fast path" in r.stdout
