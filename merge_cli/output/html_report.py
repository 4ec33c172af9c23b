"""Self-contained HTML pages: the merge report (merge_report.html), an analysis, and two merges compared.

A page has no network reference at all: the style is inline and the plots are base64 PNG data URIs
(merge_cli/output/plots.py, matplotlib). Without matplotlib a page keeps every table and says how to get
the plots. The merge report is built from merge_report.json alone (plus the recipe text and lock file
beside it), so `merge-cli report OUT_DIR` regenerates it; it reads no model.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from merge_cli.errors import MergeCliError
from merge_cli.output import plots
from merge_cli.output.run_stats import layer_table, run_findings

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0c000;padding:.4em .8em}
.finding{background:#eef6ff;border-left:4px solid #3b82f6;padding:.3em .8em;margin:.3em 0}
.cols{display:flex;gap:1.5em}.cols>div{flex:1;min-width:0}
"""


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def num(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{100 * x:.1f}%" if pct else f"{x:.4g}"
    return esc(x)


class Page:
    """An HTML page being built: sections, tables, plots (ids listed in self.plots)."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.plots: list[str] = []
        self.plots_missing = False

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{esc(text)}</h2>")

    def p(self, text: str, cls: str = "") -> None:
        self.parts.append(f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>")

    def pre(self, text: str) -> None:
        self.parts.append(f"<pre>{esc(text)}</pre>")

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def plot(self, pid: str, caption: str, png: str | None) -> None:
        """A figure from plots.*; a missing one (no matplotlib) is noted once at the top of the page."""
        if png is None:
            self.plots_missing = self.plots_missing or not plots.available()
            return
        self.plots.append(pid)
        self.parts.append(
            f'<figure id="plot-{esc(pid)}"><img alt="{esc(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    def render(self) -> str:
        note = (
            f'<p class="note">The plots need matplotlib: {esc(plots.INSTALL_HINT)}, then '
            "<code>merge-cli report OUT_DIR</code> redraws this page. The tables below hold the same figures.</p>"
            if self.plots_missing
            else ""
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{esc(self.title)}</h1>{note}"
            + "\n".join(self.parts)
            + "</body></html>\n"
        )


def write_html(path: Path, text: str) -> Path:
    """Write atomically: a temporary file beside it, renamed when complete (one-line error if it cannot)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".html", dir=path.parent)
    except OSError as e:
        raise MergeCliError(
            f"{path}: cannot write the page there ({e.strerror or e}); choose another path"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is as readable as the model
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise MergeCliError(
            f"{path}: cannot write the page ({e.strerror or e}); choose another path"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- the merge report ----------------------------------------------------------------------------


def _inputs(page: Page, report: dict, lock: dict | None) -> None:
    page.h2("Inputs")
    by_label = {m.get("label"): m for m in (lock or {}).get("models", [])}
    rows = []
    for m in report.get("models", []):
        locked = by_label.get(m["label"], {})
        files = locked.get("files") or {}
        rev = locked.get("revision") or locked.get("commit") or "-"
        hashes = "<br>".join(f"{esc(f)}: <code>{esc(h)}</code>" for f, h in files.items()) or "-"
        rows.append([esc(m["label"]), esc(m["ref"]), esc(m["path"]), esc(rev), hashes])
    page.table(["model", "reference", "path", "revision", "sha256 of files read"], rows)
    if lock is None:
        page.p("No recipe.lock.yaml beside the report: revisions and hashes are not shown.", "note")


def _summary(report: dict) -> list[list[str]]:
    return [
        [esc(m), num(r["tensors"]), num(r.get("mean_kept_fraction"), True),
         num(r.get("mean_sign_conflict_rate"), True)]
        for m, r in report.get("summary", {}).items()
    ]  # fmt: skip


def _layer_plots(page: Page, lt: dict, prefix: str = "") -> None:
    layers, experts = lt["layers"], lt["experts"]
    if lt["norm"]:
        page.plot(prefix + "norms", "Task-vector norm |tau| per layer and expert",
                  plots.line("task-vector norm per layer", layers, lt["norm"], "|tau|"))  # fmt: skip
        page.plot(prefix + "norm-heatmap", "Task-vector norm, experts x layers",
                  plots.heatmap("|tau| per expert and layer", experts, [str(k) for k in layers],
                                [lt["norm"][e] for e in experts], "|tau|"))  # fmt: skip
    if lt["kept"]:
        page.plot(prefix + "kept", "Kept fraction per layer (the method's trim/drop), per expert",
                  plots.line("kept fraction per layer", layers, lt["kept"], "kept", percent=True))  # fmt: skip
    if lt["conflict"]:
        page.plot(prefix + "conflict", "Sign-conflict rate per layer (entries where the experts disagree)",
                  plots.line("sign conflicts per layer", layers, {"conflict": lt["conflict"]}, "conflict",
                             percent=True))  # fmt: skip
        groups = lt["groups"]
        page.plot(prefix + "conflict-heatmap", "Sign-conflict rate, module groups x layers",
                  plots.heatmap("sign conflicts per group and layer", groups, [str(k) for k in layers],
                                [lt["conflict_cells"][g] for g in groups], "conflict", percent=True,
                                cmap="magma"))  # fmt: skip


def _layer_rows(lt: dict) -> tuple[list[str], list[list[str]]]:
    experts = lt["experts"]
    head = ["layer"] + [f"|tau| {e}" for e in experts]
    head += [f"kept {e}" for e in experts] if lt["kept"] else []
    head += ["sign conflict"] if lt["conflict"] else []
    rows = []
    for k, layer in enumerate(lt["layers"]):
        r = [esc(layer)] + [num(lt["norm"][e][k]) if lt["norm"] else "-" for e in experts]
        r += [num(lt["kept"][e][k], True) for e in experts] if lt["kept"] else []
        r += [num(lt["conflict"][k], True)] if lt["conflict"] else []
        rows.append(r)
    return head, rows


def _engine(page: Page, report: dict) -> None:
    e = report.get("engine", {})
    page.h2("Engine: timings and kernels")
    passes = e.get("stats_passes") or []
    rows = [[esc(f"statistics pass {p['pass']} ({p['what']})"), num(p["seconds"]), num(p["bytes_read"] / 1e6)]
            for p in passes]  # fmt: skip
    rows.append(["merge (read, compute and write overlap in threads)",
                 num(e.get("seconds", 0) - sum(p["seconds"] for p in passes)),
                 num((e.get("bytes_read", 0) - sum(p["bytes_read"] for p in passes)) / 1e6)])  # fmt: skip
    page.table(["step", "seconds", "MB read"], rows)
    page.p(
        f"device {e.get('device')}, {e.get('kernels', 'plain')} kernels; "
        f"{e.get('bytes_written', 0) / 1e6:.1f} MB written; shards reused from an interrupted run: "
        f"{e.get('shards_reused', 0)}. The engine reports the total time: reading, computing and writing "
        "run concurrently, so they have no separate durations."
    )


def merge_report_html(report: dict, recipe_text: str = "", lock: dict | None = None) -> str:
    """merge_report.html from merge_report.json's content, the recipe text and the lock (optional)."""
    page = Page(f"Merge report: {report.get('method')} ({report.get('tool')} {report.get('version')})")
    page.p(
        f"method {report.get('method')}; compute {report.get('compute_dtype')}, output {report.get('out_dtype')}; "
        f"seed {report.get('seed')}; config and tokenizer from {report.get('donor')}; "
        f"{len(report.get('tensors', []))} tensors in {len(report.get('shards', []))} shard(s)."
    )
    if report.get("notes"):
        page.h2("Warnings and notes")
        for n in report["notes"]:
            page.p(n, "note")
    page.h2("Recipe")
    page.pre(recipe_text or f"(recipe text not found; recipe: {report.get('recipe')})")
    _inputs(page, report, lock)
    page.h2("Summary per method")
    page.table(["method", "tensors", "mean kept fraction", "mean sign-conflict rate"], _summary(report))
    lt = layer_table(report)
    found = run_findings(report, lt)
    if found:
        page.h2("Findings")
        for f in found:
            page.parts.append(f'<div class="finding">{esc(f)}</div>')
    page.h2("Per layer")
    if not lt["layers"]:
        page.p("No per-layer statistics: no tensor of this merge reported task-vector figures.")
    else:
        _layer_plots(page, lt)
        page.table(*_layer_rows(lt))
        page.p(
            "Per layer: |tau| is the root of the summed squared task-vector norms of the layer's tensors; kept "
            "fraction and sign-conflict rate are means over the layer's tensors that report them (as in "
            "merge_report.json). Relative norms |tau|/|base| and pairwise statistics are in `merge-cli analyze`."
        )
    _engine(page, report)
    return page.render()


def compare_html(a: dict, b: dict, names: tuple[str, str]) -> str:
    """Two merges side by side: headline figures, and per-layer plots of both on the same axes."""
    page = Page(f"Merge comparison: {names[0]} vs {names[1]}")
    heads = []
    for name, r in ((names[0], a), (names[1], b)):
        e = r.get("engine", {})
        heads.append([esc(name), esc(r.get("method")), num(len(r.get("tensors", []))), num(e.get("seconds")),
                      esc(e.get("kernels")), esc(", ".join(m["label"] for m in r.get("models", [])))])  # fmt: skip
    page.table(["merge", "method", "tensors", "seconds", "kernels", "models"], heads)
    la, lb = layer_table(a), layer_table(b)
    xs = sorted(set(la["layers"]) | set(lb["layers"]))

    def over(lt: dict, values: list) -> list:  # one merge's per-layer values on the common layer axis
        return [dict(zip(lt["layers"], values)).get(x) for x in xs]

    for what, key, pct in (("task-vector norm (mean over experts)", "norm", False),
                           ("kept fraction (mean over experts)", "kept", True)):  # fmt: skip
        series = {n: over(lt, _mean_series(lt, key)) for n, lt in zip(names, (la, lb)) if lt[key]}
        if series:
            page.plot(f"compare-{key}", f"{what} per layer, both merges",
                      plots.line(what, xs, series, key, percent=pct))  # fmt: skip
    conf = {n: over(lt, lt["conflict"]) for n, lt in zip(names, (la, lb)) if lt["conflict"]}
    if conf:
        page.plot("compare-conflict", "sign-conflict rate per layer, both merges",
                  plots.line("sign conflicts per layer", xs, conf, "conflict", percent=True))  # fmt: skip
    page.h2("Summary per method")
    cols = []
    for name, r in ((names[0], a), (names[1], b)):
        cols.append(f"<div><h3>{esc(name)}</h3>")
        sub = Page("")
        sub.table(["method", "tensors", "mean kept fraction", "mean sign-conflict rate"], _summary(r))
        for n in r.get("notes", []):
            sub.p(n, "note")
        cols.append("".join(sub.parts) + "</div>")
    page.parts.append('<div class="cols">' + "".join(cols) + "</div>")
    return page.render()


def _mean_series(lt: dict, key: str) -> list[float | None]:
    out = []
    for k in range(len(lt["layers"])):
        vals = [lt[key][e][k] for e in lt[key] if lt[key][e][k] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


# -- the analysis (merge-cli analyze --html) ---------------------------------------------------------


def _analysis_plots(page: Page, res: dict) -> None:
    experts, rows = res["experts"], res["by_layer"]
    layers = [r["layer"] for r in rows]
    cols = [str(k) for k in layers]

    def per_layer(key: str) -> dict[str, list]:
        return {e: [r["experts"][e].get(key) for r in rows] for e in experts}

    page.plot("rel-norm", "Relative task-vector norm |tau|/|base| per layer and expert",
              plots.line("|tau| / |base| per layer", layers, per_layer("rel_norm"), "|tau|/|base|"))  # fmt: skip
    page.plot("norm-heatmap", "Task-vector norm |tau|, experts x layers",
              plots.heatmap("|tau| per expert and layer", experts, cols,
                            [per_layer("norm")[e] for e in experts], "|tau|"))  # fmt: skip
    if len(experts) > 1:
        cos = [[1.0 if a == b else None for b in experts] for a in experts]
        for p in res["overall"]["pairs"]:
            i, j = experts.index(p["a"]), experts.index(p["b"])
            cos[i][j] = cos[j][i] = p["cosine"]
        page.plot("cosine", "Pairwise cosine similarity of the task vectors (whole model)",
                  plots.heatmap("cosine of task vectors", experts, experts, cos, "cosine", cmap="coolwarm"))  # fmt: skip
        pairs = {f"{p['a']}/{p['b']}": [r["pairs"][k]["sign_conflict"] for r in rows]
                 for k, p in enumerate(res["overall"]["pairs"])}  # fmt: skip
        page.plot("conflict", "Sign-conflict rate per layer, per pair of experts (50% = independent signs)",
                  plots.line("sign conflicts per layer", layers, pairs, "conflict", percent=True))  # fmt: skip
        cells = {(c["layer"], c["group"]): c for c in res["by_layer_group"]}
        groups = sorted({c["group"] for c in res["by_layer_group"]})

        def mean_conflict(c):
            vals = [p["sign_conflict"] for p in c["pairs"] if p["sign_conflict"] is not None] if c else []
            return sum(vals) / len(vals) if vals else None

        page.plot("conflict-heatmap", "Sign-conflict rate (mean over pairs), module groups x layers",
                  plots.heatmap("sign conflicts per group and layer", groups, cols,
                                [[mean_conflict(cells.get((k, g))) for k in layers] for g in groups],
                                "conflict", percent=True, cmap="magma"))  # fmt: skip
    shares = list(res["overall"]["experts"][experts[0]]["top_mass"])
    page.plot("top-mass", "Share of L1 mass held by the largest 1/5/20% of magnitudes (per tensor)",
              plots.bars("mass in the top magnitudes", shares,
                         {e: [res["overall"]["experts"][e]["top_mass"][s] for s in shares] for e in experts},
                         "share of mass", percent=True))  # fmt: skip
    if any("kept_fraction" in r["experts"][e] for r in rows for e in experts):
        page.plot("kept", f"Kept fraction per layer under {res['method']}",
                  plots.line("kept fraction per layer", layers, per_layer("kept_fraction"), "kept", percent=True))  # fmt: skip
    if any("sign_agreement" in r["experts"][e] for r in rows for e in experts):
        page.plot("agreement", "Elected-sign agreement: share of an expert's entries whose sign the merge keeps",
                  plots.line("sign agreement with the merged change", layers, per_layer("sign_agreement"),
                             "agreement", percent=True))  # fmt: skip


def analysis_html(res: dict) -> str:
    """The page of `merge-cli analyze --html`."""
    page = Page(f"Analysis: {res.get('recipe')} ({res['method']})")
    page.p(
        f"{res['tensors_measured']} of {res['tensors']} tensors measured, {res['bytes_read'] / 1e6:.1f} MB read "
        f"in {res['seconds']:.1f} s on {res['device']}; base {res['base']}; experts {', '.join(res['experts'])}."
    )
    page.h2("Findings")
    for f in res["findings"]:
        page.parts.append(f'<div class="finding">{esc(f)}</div>')
    for n in res["notes"]:
        page.p(n, "note")
    page.h2("Recipe")
    page.pre(res.get("recipe_text") or "")
    page.h2("Inputs")
    page.table(
        ["model", "reference", "path"],
        [[esc(m["label"]), esc(m["ref"]), esc(m["path"])] for m in res["models"]],
    )
    if res["experts"]:
        page.h2("Task vectors, whole model")
        page.table(
            ["expert", "weight", "|tau|", "|tau|/|base|", "top 1%", "top 5%", "top 20%", "kept", "sign agreement"],
            [[esc(e), num(res["weights"].get(e)), num(r["norm"]), num(r["rel_norm"]), num(r["top_mass"]["1%"], True),
              num(r["top_mass"]["5%"], True), num(r["top_mass"]["20%"], True), num(r.get("kept_fraction"), True),
              num(r.get("sign_agreement"), True)] for e, r in res["overall"]["experts"].items()],
        )  # fmt: skip
        groups = list(res["by_group"])
        page.table(
            ["pair (cosine / sign conflict)", "all", *groups],
            [[esc(f"{p['a']} / {p['b']}")] + [f"{num(c['cosine'])} / {num(c['sign_conflict'], True)}"
              for c in [p] + [res["by_group"][g]["pairs"][k] for g in groups]]
             for k, p in enumerate(res["overall"]["pairs"])],
        )  # fmt: skip
        page.h2("Per layer")
        _analysis_plots(page, res)
        page.table(
            ["layer"] + [f"|tau|/|base| {e}" for e in res["experts"]] + [f"kept {e}" for e in res["experts"]],
            [[esc(r["layer"])] + [num(r["experts"][e]["rel_norm"]) for e in res["experts"]]
             + [num(r["experts"][e].get("kept_fraction"), True) for e in res["experts"]] for r in res["by_layer"]],
        )  # fmt: skip
    return page.render()


def tune_html(
    title: str, header: list[str], groups: list[str], models: list[str], start, coeffs, losses
) -> str:
    """`merge-cli tune`'s page beside the tuned recipe: the learned weight per model and group (bars, and
    a table with the starting values), and the loss per step."""
    page = Page(title)
    for line in header:
        page.p(line)
    shown = groups[:48]  # bars stay readable; the table has every group
    series = {m: [float(coeffs[g][i]) for g in range(len(shown))] for i, m in enumerate(models)}
    page.plot(
        "coefficients",
        "learned weight per model and group",
        plots.bars("learned weights", shown, series, "weight"),
    )
    if losses:
        page.plot(
            "loss",
            "objective per step",
            plots.line("objective", list(range(1, len(losses) + 1)), {"loss": losses}, "loss", xlabel="step"),
        )
    rows = [
        [esc(g), *(f"{float(c):.4f} (from {float(s):.2f})" for c, s in zip(coeffs[k], start[k]))]
        for k, g in enumerate(groups)
    ]
    page.table(["group", *models], rows)
    return page.render()
