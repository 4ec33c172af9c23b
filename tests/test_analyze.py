"""merge-cli analyze: hand-computed statistics, streamed = in-memory, findings, one-line errors."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, run_cli, tiny_family, write_model, write_recipe
from html_check import check_page
from safetensors.torch import load_file

from merge_cli.analysis.analyze import analyze
from merge_cli.analysis.stats import Acc, top_mass
from merge_cli.modules import classify
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe

# -- hand-computed statistics on tiny tensors ------------------------------------------------------


def test_norms_cosine_conflict_by_hand():
    base = torch.tensor([1.0, 2.0, 2.0, 0.0])  # |base| = 3
    x1 = base + torch.tensor([1.0, -2.0, 0.0, 3.0])  # tau1: |tau1|^2 = 14, L1 6
    x2 = base + torch.tensor([2.0, 1.0, 0.0, -1.0])  # tau2: |tau2|^2 = 6, L1 4
    acc = Acc(2)
    acc.add_piece(base, [x1, x2])
    assert acc.norm(0) == pytest.approx(math.sqrt(14))
    assert acc.rel_norm(1) == pytest.approx(math.sqrt(6) / 3)
    # dot = 2 - 2 + 0 - 3 = -3
    assert acc.cosine(0, 1) == pytest.approx(-3 / math.sqrt(14 * 6))
    # both non-zero at 0, 1, 3; opposite signs at 1 and 3
    assert (acc.both[0][1], acc.opp[0][1]) == (3, 2)
    assert acc.conflict_rate(0, 1) == pytest.approx(2 / 3)
    assert acc.l1 == [6.0, 4.0]
    # n = 4: the top 1%, 5% and 20% are each ceil(p * 4) = 1 entry: |3| of 6, |2| of 4
    assert acc.top_share(0) == pytest.approx([0.5, 0.5, 0.5])
    assert acc.top_share(1) == pytest.approx([0.5, 0.5, 0.5])


def test_top_mass_of_a_large_tensor_is_exact():
    """Above 4 x SAMPLE entries the sampled bracket is used: it must give torch.topk's exact sums."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300_000, generator=g).abs() * (torch.rand(300_000, generator=g) < 0.3)  # many ties at 0
    want = [float(torch.topk(a, math.ceil(p * a.numel())).values.double().sum()) for p in (0.01, 0.05, 0.2)]
    assert top_mass(a) == pytest.approx(want, rel=1e-6)
    b = torch.ones(300_000)  # every value tied
    assert top_mass(b) == pytest.approx([3000, 15000, 60000])


def test_top_mass_by_hand():
    a = torch.arange(1, 101, dtype=torch.float32)[torch.randperm(100)]  # 1..100, shuffled; L1 5050
    # top 1% = {100}, top 5% = {96..100}, top 20% = {81..100}
    assert top_mass(a) == pytest.approx([100, 490, 1810])
    acc = Acc(1)
    acc.add_piece(torch.zeros(100), [a])
    assert acc.top_share(0) == pytest.approx([100 / 5050, 490 / 5050, 1810 / 5050])


def test_pieces_and_merge_add_up():
    g = torch.Generator().manual_seed(0)
    base, x1, x2 = (torch.randn(1000, generator=g) for _ in range(3))
    whole = Acc(2)
    whole.add_piece(base, [x1, x2])
    parts, left, right = Acc(2), Acc(2), Acc(2)
    parts.add_piece(base[:300], [x1[:300], x2[:300]])
    parts.add_piece(base[300:], [x1[300:], x2[300:]])
    left.add_piece(base[:300], [x1[:300], x2[:300]])
    right.add_piece(base[300:], [x1[300:], x2[300:]])
    left.merge(right)
    for acc in (parts, left):
        assert acc.numel == 1000
        assert acc.sq == pytest.approx(whole.sq)
        assert acc.dot[0][1] == pytest.approx(whole.dot[0][1]) and acc.dot[1][0] == acc.dot[0][1]
        assert acc.both == whole.both and acc.opp == whole.opp
        assert acc.base_sq == pytest.approx(whole.base_sq)


def test_effect_by_hand():
    base = torch.zeros(4)
    taus = [torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([-1.0, -1.0, 0.0, 1.0])]
    merged = torch.tensor([0.5, -1.0, 0.0, 2.0])  # delta signs: +, -, 0, +
    acc = Acc(2)
    got = acc.add_piece(base, [base + t for t in taus])
    assert torch.equal(got, torch.stack(taus))
    acc.add_effect(base, got, merged, {"kept_fraction": [0.75, 0.5], "sign_conflict_rate": 0.25})
    # expert 0: entries 0, 1 count (entry 2 has a zero delta, entry 3 a zero tau): both agree
    # expert 1: entries 0 (-, +: disagree), 1 (agree), 3 (agree)
    assert (acc.agree, acc.agree_den) == ([2, 2], [2, 3])
    j = acc.to_json(["a", "b"])
    assert j["experts"]["a"]["kept_fraction"] == 0.75 and j["experts"]["b"][
        "sign_agreement"
    ] == pytest.approx(2 / 3, abs=1e-6)
    assert j["method_sign_conflict"] == 0.25


# -- analyze over real (tiny, sharded) checkpoints = an in-memory computation ----------------------


def _recipe(tmp_path, paths, method="ties", **params):
    experts = [k for k in paths if k != "base"]
    return write_recipe(
        tmp_path / "r.yaml",
        {
            "base_model": str(paths["base"]),
            "models": [
                {"model": str(paths[e]), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts
            ]
            if method in ("ties", "dare_ties")
            else [{"model": str(paths[e]), "parameters": {"weight": 1.0}} for e in experts],
            "method": method,
            "parameters": params,
            "dtype": "float32",
        },
    )


def _load(folder: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _in_memory(paths, experts):
    """An independent computation over whole state dicts: per layer and in all, norms, cosine, conflict."""
    base = _load(paths["base"])
    xs = [_load(paths[e]) for e in experts]
    out = {}
    for key in ["all"] + [k for k in range(TINY_CONFIG["num_hidden_layers"])]:
        names = [n for n in base if key == "all" or classify(n).layer == key]
        taus = [torch.cat([(x[n].double() - base[n].double()).flatten() for n in names]) for x in xs]
        b = torch.cat([base[n].double().flatten() for n in names])
        cos = float(taus[0] @ taus[1] / (taus[0].norm() * taus[1].norm()))
        s0, s1 = torch.sign(taus[0]), torch.sign(taus[1])
        both = (s0 != 0) & (s1 != 0)
        conflict = float(((s0 * s1) < 0).sum() / both.sum())
        out[key] = {"norms": [float(t.norm()) for t in taus], "rel": [float(t.norm() / b.norm()) for t in taus],
                    "cos": cos, "conflict": conflict}  # fmt: skip
    return out


def test_analyze_sharded_equals_in_memory(tmp_path):
    paths = tiny_family(tmp_path, n_experts=2)  # expert1 is sharded (index + 2 files)
    r = run_cli("analyze", _recipe(tmp_path, paths), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["experts"] == ["expert0", "expert1"] and res["base"] == "base"
    want = _in_memory(paths, res["experts"])
    rows = {"all": res["overall"], **{row["layer"]: row for row in res["by_layer"]}}
    for key, w in want.items():
        got = rows[key]
        for i, e in enumerate(res["experts"]):
            assert got["experts"][e]["norm"] == pytest.approx(w["norms"][i], rel=1e-5)
            assert got["experts"][e]["rel_norm"] == pytest.approx(w["rel"][i], rel=1e-5)
        assert got["pairs"][0]["cosine"] == pytest.approx(w["cos"], abs=1e-5)
        assert got["pairs"][0]["sign_conflict"] == pytest.approx(w["conflict"], abs=1e-6)
    # ties with density 0.5 keeps int(0.5 n) entries of each tensor: the entry-weighted mean over tensors
    base = _load(paths["base"])
    n_all = sum(t.numel() for t in base.values())
    kept = sum(max(1, int(0.5 * t.numel())) for t in base.values()) / n_all
    for e in res["experts"]:
        assert res["overall"]["experts"][e]["kept_fraction"] == pytest.approx(kept, abs=1e-6)
        assert 0.5 < res["overall"]["experts"][e]["sign_agreement"] <= 1.0


def test_pieces_equal_whole_tensors(tmp_path):
    """A budget too small for any tensor: pieces give the same sums; an elementwise kernel still runs."""
    paths = tiny_family(tmp_path, n_experts=2)
    plan = build_plan(load_recipe(_recipe(tmp_path, paths, method="task_arithmetic")))
    try:
        whole = analyze(plan, 1 << 30)
        pieced = analyze(plan, 8 << 10)
    finally:
        plan.close()
    assert not pieced["effect_skipped"]  # task_arithmetic is elementwise
    for a, b in ((whole["overall"], pieced["overall"]), (whole["by_layer"][2], pieced["by_layer"][2])):
        for e in whole["experts"]:
            assert b["experts"][e]["norm"] == pytest.approx(a["experts"][e]["norm"], rel=1e-6)
            assert b["experts"][e]["sign_agreement"] == pytest.approx(
                a["experts"][e]["sign_agreement"], abs=1e-9
            )
        assert b["pairs"][0]["sign_conflict"] == pytest.approx(a["pairs"][0]["sign_conflict"], abs=1e-9)
    plan = build_plan(load_recipe(_recipe(tmp_path, paths, method="ties")))
    try:
        pieced = analyze(plan, 8 << 10)
    finally:
        plan.close()
    assert pieced["effect_skipped"] and any("read in pieces" in n for n in pieced["notes"])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_fast_kernels_give_the_plain_kernels_figures(tmp_path, method, monkeypatch):
    """analyze runs the engine's fast CPU kernels where they apply: the same figures as the plain kernels."""
    import merge_cli.kernels.dispatch as dispatch

    ran, real = [], dispatch.whole
    monkeypatch.setattr(dispatch, "whole", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    paths = tiny_family(tmp_path, n_experts=2)
    extra = {"trim_density": 1.0} if method == "dare_ties" else {}  # (MergeLM's extra trim: plain kernels)
    plan = build_plan(load_recipe(_recipe(tmp_path, paths, method=method, **extra)))
    try:
        fast, plain = analyze(plan, 1 << 30), analyze(plan, 1 << 30, fast=False)
    finally:
        plan.close()
    assert sum(r is not None for r in ran) == len(plan.jobs)  # every tensor went through a fast kernel
    for key in ("overall", "by_layer", "by_group"):
        assert fast[key] == plain[key]
    assert "sign_agreement" in fast["overall"]["experts"]["expert0"]


# -- findings --------------------------------------------------------------------------------------


def _family(tmp_path, scale_layers=(2, 3), factor=10.0, opposed_mlp=True):
    """base, a and b: b's task vector is `factor` x a's in scale_layers; in MLP tensors b = -a (opposed)."""
    g = torch.Generator().manual_seed(3)
    names = [f"model.layers.{k}.{m}.weight" for k in range(4) for m in ("self_attn.q_proj", "mlp.up_proj")]
    base = {n: torch.randn(8, 8, generator=g) for n in names}
    a, b = {}, {}
    for n in names:
        ta, tb = torch.randn(8, 8, generator=g) * 0.01, torch.randn(8, 8, generator=g) * 0.01
        if opposed_mlp and "mlp" in n:
            tb = -ta
        if classify(n).layer in scale_layers:
            tb = tb / tb.norm() * ta.norm() * factor
        else:
            tb = tb / tb.norm() * ta.norm()
        a[n], b[n] = base[n] + ta, base[n] + tb
    paths = {k: write_model(tmp_path / k, sd) for k, sd in (("base", base), ("a", a), ("b", b))}
    return write_recipe(
        tmp_path / "f.yaml",
        {"base_model": str(paths["base"]), "method": "task_arithmetic", "dtype": "float32",
         "models": [{"model": str(paths["a"]), "parameters": {"weight": 0.6}},
                    {"model": str(paths["b"]), "parameters": {"weight": 0.6}}]},
    )  # fmt: skip


def test_findings_name_imbalance_and_conflict(tmp_path):
    r = run_cli("analyze", _family(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    text = "\n".join(res["findings"])
    labels = res["experts"]
    assert f"{labels[1]}'s task vector is 10.0x the others' in layers 2-3: consider weight 0.06" in text
    assert f"{labels[0]}'s task vector is only 0.10x the others' in layers 2-3" in text
    assert f"{labels[0]} and {labels[1]} conflict in 100% of signs in mlp layers" in text


def test_findings_quiet_when_balanced(tmp_path):
    paths = tiny_family(tmp_path, n_experts=2)
    plan = build_plan(load_recipe(_recipe(tmp_path, paths, method="task_arithmetic")))
    try:
        res = analyze(plan, 1 << 30)
    finally:
        plan.close()
    assert not any("x the others'" in f for f in res["findings"])  # the two experts are alike in size


# -- the command: tables, HTML, one-line errors ----------------------------------------------------


def test_analyze_prints_tables_and_writes_html(tmp_path):
    recipe = _family(tmp_path)
    page = tmp_path / "a.html"
    r = run_cli("analyze", recipe, "--html", page, "-q")
    assert r.exit_code == 0, r.output
    assert "findings" in r.stdout and "consider weight" in r.stdout
    text = page.read_text()
    found = check_page(text)
    assert set(found.figures) >= {"plot-rel-norm", "plot-norm-heatmap", "plot-cosine", "plot-conflict",
                                  "plot-conflict-heatmap", "plot-top-mass", "plot-agreement"}  # fmt: skip
    assert "method: task_arithmetic" in found.pre_text  # the recipe, as text


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda tmp: tmp / "missing.yaml", "missing.yaml"),
        (lambda tmp: write_recipe(tmp / "r.yaml", "models: [{model: " + str(tmp / "nope") + "}]\nmethod: linear\n"),
         "nope"),
        (lambda tmp: write_recipe(tmp / "r.yaml", "method: [unclosed\n"), "r.yaml"),
    ],
)  # fmt: skip
def test_analyze_bad_input_is_one_line(tmp_path, make, needle):
    r = run_cli("analyze", make(tmp_path))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in r.output


def test_analyze_unwritable_html_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("analyze", _family(tmp_path), "-q", "--html", tmp_path / "file" / "a.html")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "a.html" in lines[0]


def test_analyze_nonfinite_input_is_one_line(tmp_path):
    base = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4)}
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    paths = {"base": write_model(tmp_path / "base", base)}
    paths["a"] = write_model(tmp_path / "a", {"model.layers.0.mlp.up_proj.weight": torch.ones(4, 4)})
    paths["b"] = write_model(tmp_path / "b", {"model.layers.0.mlp.up_proj.weight": bad})
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"base_model": str(paths["base"]), "method": "task_arithmetic",
         "models": [{"model": str(paths["a"])}, {"model": str(paths["b"])}]},
    )  # fmt: skip
    r = run_cli("analyze", recipe, "-q")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.layers.0.mlp.up_proj.weight" in lines[0] and "NaN" in lines[0]
