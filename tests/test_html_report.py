"""merge_report.html: written by every run, self-contained, redrawn by `merge-cli report`, compared."""

import json
import sys

import pytest
import yaml
from helpers import run_cli, tiny_family, write_recipe
from html_check import check_page

from merge_cli.output.html_report import merge_report_html
from merge_cli.output.run_stats import layer_table

RUN_PLOTS = {"plot-norms", "plot-norm-heatmap", "plot-kept", "plot-conflict", "plot-conflict-heatmap"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("fam"), n_experts=2)


def _merge(tmp_path, family, method, name):
    recipe = write_recipe(
        tmp_path / f"{name}.yaml",
        {"base_model": str(family["base"]), "method": method, "dtype": "float32", "seed": 1,
         "models": [{"model": str(family[e]), "parameters": {"weight": 0.5, "density": 0.4}}
                    for e in ("expert0", "expert1")]},
    )  # fmt: skip
    out = tmp_path / name
    r = run_cli("run", recipe, out, "-q")
    assert r.exit_code == 0, r.output
    return out


def test_run_writes_self_contained_html(tmp_path, family):
    out = _merge(tmp_path, family, "ties", "ties")
    assert (out / "merge_report.json").exists() and (out / "merge_report.md").exists()
    text = (out / "merge_report.html").read_text()
    found = check_page(text)
    assert set(found.figures) == RUN_PLOTS
    recipe = yaml.safe_load(found.pre_text)  # the recipe, verbatim
    assert recipe["method"] == "ties" and recipe["seed"] == 1
    lock = yaml.safe_load((out / "recipe.lock.yaml").read_text())
    for m in lock["models"]:  # inputs with the hashes of the files read
        for sha in m["files"].values():
            assert sha in found.text
    report = json.loads((out / "merge_report.json").read_text())
    assert report["experts"] == ["expert0", "expert1"]
    assert "native kernels" in found.text or "plain kernels" in found.text or "eager kernels" in found.text


def test_report_command_redraws_the_same_page(tmp_path, family):
    out = _merge(tmp_path, family, "ties", "ties")
    first = (out / "merge_report.html").read_bytes()
    (out / "merge_report.html").unlink()
    r = run_cli("report", out)
    assert r.exit_code == 0, r.output
    assert (out / "merge_report.html").read_bytes() == first  # from merge_report.json alone


def test_compare_two_merges(tmp_path, family):
    a = _merge(tmp_path, family, "ties", "ties")
    b = _merge(tmp_path, family, "dare_ties", "dare")
    page = tmp_path / "cmp.html"
    r = run_cli("report", "--compare", a, b, "-o", page)
    assert r.exit_code == 0, r.output
    found = check_page(page.read_text())
    assert set(found.figures) == {"plot-compare-norm", "plot-compare-kept", "plot-compare-conflict"}
    assert "ties" in found.text and "dare_ties" in found.text


def test_without_matplotlib_tables_and_a_note(tmp_path, family, monkeypatch):
    out = _merge(tmp_path, family, "ties", "ties")
    report = json.loads((out / "merge_report.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    found = check_page(merge_report_html(report, "method: ties\n", None))
    assert found.figures == [] and found.images == []
    assert "pip install 'merge-cli[report]'" in found.text
    assert "|tau| expert0" in found.text  # the per-layer table is there


def test_layer_table_by_hand():
    report = {
        "experts": ["a", "b"],
        "tensors": [
            {"name": "model.layers.0.mlp.up_proj.weight", "task_vector_norms": [3.0, 4.0],
             "kept_fraction": [0.2, 0.4], "sign_conflict_rate": 0.1},
            {"name": "model.layers.0.self_attn.q_proj.weight", "task_vector_norms": [4.0, 3.0],
             "kept_fraction": [0.4, 0.6], "sign_conflict_rate": 0.3},
            {"name": "model.layers.1.mlp.up_proj.weight", "task_vector_norms": [1.0, 0.0]},
            {"name": "model.embed_tokens.weight", "task_vector_norms": [9.0, 9.0]},  # no layer: not in the table
        ],
    }  # fmt: skip
    lt = layer_table(report)
    assert lt["layers"] == [0, 1]
    assert lt["norm"] == {"a": [5.0, 1.0], "b": [5.0, 0.0]}
    assert lt["kept"]["a"] == [pytest.approx(0.3), None] and lt["kept"]["b"] == [pytest.approx(0.5), None]
    assert lt["conflict"] == [pytest.approx(0.2), None]
    assert lt["conflict_cells"] == {"attention": [0.3, None], "mlp": [0.1, None]}


@pytest.mark.parametrize("setup", ["missing", "no_json", "bad_json", "not_a_report"])
def test_report_bad_input_is_one_line(tmp_path, setup):
    folder = tmp_path / "out"
    if setup != "missing":
        folder.mkdir()
    if setup == "bad_json":
        (folder / "merge_report.json").write_text("{not json")
    if setup == "not_a_report":
        (folder / "merge_report.json").write_text('{"hello": 1}')
    r = run_cli("report", folder)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "out" in lines[0]


def test_a_drawing_failure_does_not_fail_the_merge(tmp_path, family, monkeypatch):
    import merge_cli.output.html_report as html_report

    def broken(*a, **k):
        raise ValueError("plotting broke")

    monkeypatch.setattr(html_report, "merge_report_html", broken)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"base_model": str(family["base"]), "method": "task_arithmetic",
         "models": [{"model": str(family["expert0"])}]},
    )  # fmt: skip
    r = run_cli("run", recipe, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert "merge_report.html was not written (ValueError: plotting broke)" in r.stderr
    assert (tmp_path / "out" / "merge_report.json").exists() and (
        tmp_path / "out" / "merge_report.md"
    ).exists()
    assert not (tmp_path / "out" / "merge_report.html").exists()


def test_run_report_names_a_dominant_expert(tmp_path):
    """The norm-imbalance rule of analyze also runs on the engine's figures in merge_report.html."""
    tensors = []
    for layer in range(4):
        big = 10.0 if layer in (2, 3) else 1.0
        tensors.append({"name": f"model.layers.{layer}.mlp.up_proj.weight", "method": "task_arithmetic",
                        "params": {"weight": [0.5, 0.5]}, "task_vector_norms": [1.0, big]})  # fmt: skip
    report = {"tool": "merge-cli", "method": "task_arithmetic", "experts": ["a", "b"], "tensors": tensors}
    found = check_page(merge_report_html(report, "", None))
    assert (
        "b's task vector is 10.0x the others' in layers 2-3: consider weight 0.05 there (now 0.5)"
        in found.text
    )
