"""Engine: chunked (row-streamed) merges are bitwise equal to whole-tensor merges; memory budget; devices."""

import pytest
import torch
from helpers import load_output, merge_in_process, run_cli, write_model, write_recipe

from merge_cli.engine import EngineOptions, resolve_device, working_bytes
from merge_cli.errors import MergeCliError
from merge_cli.merge import execute
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe


def _models(tmp_path):
    """A base and two experts with a big 'embedding' (4000 x 64) that a small budget forces into chunks."""
    g = torch.Generator().manual_seed(11)
    base = {
        "model.embed_tokens.weight": torch.randn(4000, 64, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(64).bfloat16(),
    }
    paths = {"base": write_model(tmp_path / "base", base)}
    for i in range(2):
        sd = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
        sd["model.embed_tokens.weight"][::5] = base["model.embed_tokens.weight"][
            ::5
        ]  # unchanged rows: exact ties
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", sd)
    return paths


def _recipe(tmp_path, m, method: str, params: str, top: str, params_for_both: bool = True):
    """Two experts (and the base, for methods that need it); `params` for e0, and for e1 if params_for_both."""
    base = f"base_model: {m['base']}\n" if method != "linear" else ""
    e1 = f"  - model: {m['e1']}\n" + (f"    parameters: {params}\n" if params_for_both else "")
    return write_recipe(
        tmp_path / "r.yaml",
        f"{base}models:\n  - model: {m['e0']}\n    parameters: {params}\n{e1}method: {method}\nparameters: {top}\n",
    )


def _merge(tmp_path, recipe, label: str, **options):
    """(output tensors, report stats by tensor name, MergeOutcome) of one merge into tmp_path / label."""
    out, result = merge_in_process(tmp_path, recipe, label, **options)
    return out, {t["name"]: t for t in result.report["tensors"]}, result


@pytest.mark.parametrize(
    "method,params,top",
    [
        ("ties", "{density: 0.3}", "{}"),
        ("ties", "{density: 0.7}", "{merge_func: max, weighted_election: true}"),
        ("linear", "{weight: 0.6}", "{}"),
        ("linear", "{weight: 0.7}", "{numerics: mergekit}"),
        ("task_arithmetic", "{weight: 0.5}", "{lambda: 0.7}"),
    ],
)
def test_chunked_merge_is_bitwise_equal_to_whole(tmp_path, method, params, top):
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, method, params, top)
    a, ra, whole = _merge(tmp_path, recipe, "whole", max_memory=1 << 30)
    b, rb, chunked = _merge(tmp_path, recipe, "chunked", max_memory=600_000)
    assert whole.engine.chunked == []
    assert chunked.engine.chunked == ["model.embed_tokens.weight"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    emb = "model.embed_tokens.weight"
    for key in ("kept_fraction", "sign_conflict_rate", "task_vector_norms"):
        if key in ra[emb]:
            assert rb[emb][key] == pytest.approx(ra[emb][key], rel=1e-5), key


def test_working_bytes_counts_inputs_and_temporaries(tmp_path):
    m = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml", f"base_model: {m['base']}\nmodels: [{m['e0']}, {m['e1']}]\nmethod: ties\n"
    )
    plan = build_plan(load_recipe(recipe))
    job = next(j for j in plan.jobs if j.name == "model.embed_tokens.weight")
    n = 4000 * 64
    # 3 inputs read as bf16, each held in fp32, 4 temporaries, and the bf16 output
    assert working_bytes(plan, job) == 3 * 2 * n + n * 4 * (3 + 4) + 2 * n
    plan.close()


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(MergeCliError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergeCliError) as e:
            resolve_device("cuda")
        assert str(e.value) == "--device cuda: no CUDA device is available here; use --device cpu or auto"


def test_cli_max_memory_option(tmp_path):
    m = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml", f"base_model: {m['base']}\nmodels: [{m['e0']}]\nmethod: ties\n"
    )
    r = run_cli("run", recipe, tmp_path / "o", "-q", "--max-memory", "600KB")
    assert r.exit_code == 0, r.stderr
    r = run_cli("run", recipe, tmp_path / "o2", "-q", "--max-memory", "lots")
    assert r.exit_code == 2 and "--max-memory: cannot read size 'lots'" in r.stderr


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path):
    m = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"base_model: {m['base']}\nmodels: [{m['e0']}, {m['e1']}]\nmethod: ties\nout_dtype: float32\n",
    )
    for dev in ("cpu", "cuda"):
        plan = build_plan(load_recipe(recipe))
        execute(plan, tmp_path / dev, options=EngineOptions(device=dev))
        plan.close()
    a, b = load_output(tmp_path / "cpu"), load_output(tmp_path / "cuda")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.parametrize(
    "method,params,top",
    [
        ("ties", "{density: 0.3, weight: 0.7}", "{}"),
        ("ties", "{density: 0.6}", "{merge_func: sum, weighted_election: true, lambda: 0.8}"),
        ("linear", "{weight: 0.6}", "{}"),
        ("linear", "{weight: 0.7}", "{numerics: mergekit}"),
        ("task_arithmetic", "{weight: 0.5}", "{lambda: 0.7}"),
    ],
)
def test_fused_kernels_are_bitwise_equal_to_eager_whole_and_chunked(tmp_path, method, params, top):
    """The blocked kernels give the same bits as the eager kernels, whole and in row chunks."""
    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, method, params, top, params_for_both=False)
    ref, ref_stats, _ = _merge(tmp_path, recipe, "eager", max_memory=1 << 30, fused="off")
    for label, budget in (("fused", 1 << 30), ("fused_chunked", 600_000)):
        got, stats, _ = _merge(tmp_path, recipe, label, max_memory=budget, fused="on")
        for name in ref:
            assert torch.equal(ref[name], got[name]), (label, name)
            for key in ("kept_fraction", "sign_conflict_rate", "task_vector_norms"):
                if key in ref_stats[name]:
                    assert key in stats[name], (label, name, key)
                    assert stats[name][key] == pytest.approx(ref_stats[name][key], rel=1e-5), (
                        label,
                        name,
                        key,
                    )


def test_fused_ties_with_mergekit_selection_equals_eager(tmp_path):
    """numerics: mergekit: the blocked kernel gives the plain kernel's bits, whole (it hands tensors whose
    threshold magnitudes tie to the plain kernel, which sorts) and in row chunks (both: lowest index)."""
    m = _models(tmp_path)
    top = "{numerics: mergekit, weighted_election: true}"
    recipe = _recipe(tmp_path, m, "ties", "{density: 0.3, weight: 0.7}", top, params_for_both=False)
    for label, budget in (("whole", 1 << 30), ("chunked", 600_000)):
        ref, _, _ = _merge(tmp_path, recipe, f"eager_{label}", max_memory=budget, fused="off")
        got, _, _ = _merge(tmp_path, recipe, f"fused_{label}", max_memory=budget, fused="on")
        for name in ref:
            assert torch.equal(ref[name], got[name]), (label, name)


def _bad_source_error(tmp_path, method: str, tensor: str, at, value: float, **options) -> str:
    """The CheckpointError text of a blocked-kernel merge (`--fused on`) where expert e1 holds `value` at
    `at` of `tensor`; the output folder must not appear."""
    from merge_cli.errors import CheckpointError

    m = _models(tmp_path)
    bad = load_output(m["e1"])
    bad[tensor][at] = value
    write_model(tmp_path / "bad", bad)
    base = f"base_model: {m['base']}\n" if method != "linear" else ""
    recipe = write_recipe(
        tmp_path / "r.yaml", f"{base}models: [{m['e0']}, {tmp_path / 'bad'}]\nmethod: {method}\n"
    )
    plan = build_plan(load_recipe(recipe))
    with pytest.raises(CheckpointError) as e:
        execute(plan, tmp_path / "out", options=EngineOptions(fused="on", **options))
    plan.close()
    assert not (tmp_path / "out").exists()
    return str(e.value)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties"])
def test_fused_path_still_stops_on_nan_in_a_source(tmp_path, method):
    msg = _bad_source_error(tmp_path, method, "model.layers.0.mlp.up_proj.weight", (3, 5), float("nan"))
    assert msg.startswith(
        "model 'bad': tensor 'model.layers.0.mlp.up_proj.weight' holds 1 NaN value(s) out of 6144"
    )


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_fused_chunked_path_stops_on_nan_in_embedding_rows(tmp_path, method):
    msg = _bad_source_error(
        tmp_path, method, "model.embed_tokens.weight", (2500, 7), float("inf"), max_memory=600_000
    )
    assert msg.startswith("model 'bad': tensor 'model.embed_tokens.weight' holds 1 Inf value(s) out of ")
    assert " in rows " in msg


def use_kernels(monkeypatch, kernels: str) -> None:
    """Run the blocked merges on the native kernels (skipped without a C compiler) or on the eager ones."""
    from merge_cli.kernels import native

    if kernels == "eager":
        monkeypatch.setattr(native, "lib", lambda: None)
    elif native.lib() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


def _quantised_models(tmp_path):
    """Experts whose deltas are small multiples of one step (as bf16 fine-tunes are): |tau| takes a handful
    of values, so the top-k threshold sits on a value shared by thousands of entries (exact ties)."""
    g = torch.Generator().manual_seed(5)
    base = {
        "model.embed_tokens.weight": torch.randn(4000, 64, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g).bfloat16(),
        "model.norm.weight": torch.ones(64).bfloat16(),
    }
    paths = {"base": write_model(tmp_path / "base", base)}
    for i in range(3):
        sd = {
            k: (v.float() + 2.0**-6 * torch.randint(-3, 4, v.shape, generator=g).float()).bfloat16()
            for k, v in base.items()
        }
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", sd)
    return paths


@pytest.mark.parametrize(
    "method,models_params,top",
    [
        ("ties", ["{density: 0.3}", "{density: 0.5, weight: 0.7}", "{density: 0.2, weight: 1.3}"], "{}"),
        ("ties", ["{density: 0.45}", "{density: 1.0}", "{density: 0.3, weight: -0.5}"], "{merge_func: sum}"),
        ("ties", ["{density: 0.6}", "{density: 0.6}", "{density: 0.6}"], "{weighted_election: false}"),
        ("linear", ["{weight: 0.2}", "{weight: 0.5}", "{weight: 0.3}"], "{}"),
        ("task_arithmetic", ["{weight: 0.5}", "{weight: -0.25}", "{weight: 1.0}"], "{lambda: 0.7}"),
        (
            "dare_ties",
            ["{density: 0.3}", "{density: 0.5, weight: 0.7}", "{density: 1.0, weight: -0.4}"],
            "{rescale: l1, trim_density: 1.0, normalize: false}",
        ),
        (
            "dare_ties",
            ["{density: 0.3}", "{density: 0.6}", "{density: 0.0}"],
            "{trim_density: 1.0, lambda: 0.8}",
        ),
        ("dare_linear", ["{density: 0.3}", "{density: 0.5, weight: 0.7}", "{density: 0.9}"], "{rescale: l1}"),
        (
            "dare_linear",
            ["{density: 0.2}", "{density: 0.5}", "{density: 0.9}"],
            "{rescale: none, normalize: true}",
        ),
        (
            "breadcrumbs_ties",
            ["{density: 0.3, gamma: 0.01}", "{density: 0.5, weight: -0.7}", "{density: 0.9, gamma: 0.1}"],
            "{granularity: tensor, normalize: true}",
        ),
        (
            "breadcrumbs",
            ["{density: 0.3, gamma: 0.01}", "{density: 1.0}", "{density: 0.9, gamma: 0.0}"],
            "{granularity: tensor, lambda: 0.9}",
        ),
    ],
)
@pytest.mark.parametrize(
    "block,kernels", [(777, "eager"), (4096, "eager"), (777, "native"), (4096, "native")]
)
def test_blocked_kernels_equal_eager_across_block_boundaries(
    tmp_path, monkeypatch, method, models_params, top, block, kernels
):
    """Blocks much smaller than the tensors (so TIES tie quotas end inside a block), on quantised deltas
    (thresholds shared by thousands of entries): still bitwise equal to the eager kernels, whole and chunked.
    `kernels`: the blocked merges run on the native kernels (merge_cli/kernels/native) or on kernels/blocked.py's eager ones."""
    from merge_cli.kernels import blocked as fused

    use_kernels(monkeypatch, kernels)
    m = _quantised_models(tmp_path)
    base = f"base_model: {m['base']}\n" if method != "linear" else ""
    models = "".join(f"  - model: {m[f'e{i}']}\n    parameters: {p}\n" for i, p in enumerate(models_params))
    recipe = write_recipe(
        tmp_path / "r.yaml", f"{base}models:\n{models}method: {method}\nparameters: {top}\n"
    )
    ref, ref_stats, _ = _merge(tmp_path, recipe, "eager", max_memory=1 << 30, fused="off")
    monkeypatch.setattr(fused, "BLOCK", block)
    for label, budget in (("blocked", 1 << 30), ("blocked_chunked", 600_000)):
        got, stats, _ = _merge(tmp_path, recipe, label, max_memory=budget, fused="on")
        for name in ref:
            assert torch.equal(ref[name], got[name]), (label, name)
            for key in ("kept_fraction", "sign_conflict_rate", "task_vector_norms"):
                if key in ref_stats[name]:
                    assert stats[name][key] == pytest.approx(ref_stats[name][key], rel=1e-5), (
                        label,
                        name,
                        key,
                    )


@pytest.mark.parametrize("miss", [False, True])
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.77])
def test_blocked_select_matches_plain_topk(monkeypatch, quantised, density, miss):
    """The blocked selection (sample bracket + one counting pass) finds the same threshold and tie cutoff as
    a plain sort: keeping |tau| > value plus the first take_equal equal entries gives exactly the top k."""
    from merge_cli.kernels import blocked as fused
    from merge_cli.kernels import ties as fused_methods

    monkeypatch.setattr(fused, "BLOCK", 1000)
    if miss:  # a bracket that misses the threshold: the radix fallback must give the same answer
        monkeypatch.setattr(fused_methods, "bracket", lambda sample, k, n: (5.0, 6.0))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(70_000, generator=g).bfloat16()
    if quantised:
        x = (base.float() + 2.0**-5 * torch.randint(-4, 5, base.shape, generator=g).float()).bfloat16()
    else:
        x = (base.float() + 0.01 * torch.randn(base.shape, generator=g)).bfloat16()
    a = (x.float() - base.float()).abs()
    k = int(density * a.numel())
    (t,), (cut,) = fused_methods.ties_thresholds(base, [x], [density])
    # independent: a stable descending sort; the k-th value and the index order of equal entries
    order = torch.sort(-a, stable=True).indices
    kth = float(a[order[k - 1]])
    assert t.value == kth
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    mine = (a > t.value) | ((a == t.value) & (torch.arange(a.numel()) < cut))
    assert torch.equal(mine, keep)


def test_chunked_ties_with_a_missed_bracket_is_still_exact(tmp_path, monkeypatch):
    """Row-chunked TIES whose sample bracket misses every threshold (forced): the radix fallback and the
    recount give the eager result bit for bit."""
    from merge_cli.kernels import blocked as fused
    from merge_cli.kernels import ties as fused_methods

    m = _quantised_models(tmp_path)
    recipe = _recipe(tmp_path, m, "ties", "{density: 0.35}", "{}")
    ref, _, _ = _merge(tmp_path, recipe, "eager", max_memory=1 << 30, fused="off")
    monkeypatch.setattr(fused, "BLOCK", 3000)
    monkeypatch.setattr(fused_methods, "bracket", lambda sample, k, n: (-2.0, -1.0))
    got, _, res = _merge(tmp_path, recipe, "chunked", max_memory=600_000, fused="on")
    assert res.engine.chunked == ["model.embed_tokens.weight"]
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_report_names_the_kernels_that_ran(tmp_path, monkeypatch):
    """The engine says which CPU kernels merged: native, eager blocked (with why), or plain (--fused off)."""
    from merge_cli.kernels import native

    m = _models(tmp_path)
    recipe = _recipe(tmp_path, m, "ties", "{density: 0.5}", "{}")
    _, _, res = _merge(tmp_path, recipe, "plain", fused="off")
    assert res.engine.kernels == "plain kernels: --fused off"
    if native.lib() is not None:
        _, _, res = _merge(tmp_path, recipe, "native", fused="on")
        assert res.engine.kernels == "native"
    monkeypatch.setattr(native, "lib", lambda: None)
    monkeypatch.setattr(native, "_why", ["no C compiler found (set CC)"])
    _, _, res = _merge(tmp_path, recipe, "eager", fused="on")
    assert res.engine.kernels == "eager blocked (no C compiler found (set CC))"
