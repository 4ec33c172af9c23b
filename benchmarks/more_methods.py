"""The methods beyond run.py's five, as model cards write them: della, della_linear, sce, model_stock, slerp
and nuslerp in mergekit-format recipes, `dtype: bfloat16` or `float32` compute, on the qwen0.5b models.

Each recipe is timed with merge-cli (medians of --repeats, the page cache warm) and, with --mergekit, once
with mergekit 0.1.5 on the same file. slerp and nuslerp interpolate the base and the first expert (t = 0.5);
the others merge the three experts onto the base.

    python benchmarks/more_methods.py [--dtypes bfloat16,float32] [--repeats 3] [--mergekit]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import gen_models
import mergekit_env
from harness import measure, merge_cli_cmd, mergekit_cmd, write_yaml

REPO = Path(__file__).resolve().parent.parent
METHODS = ["della", "della_linear", "sce", "model_stock", "slerp", "nuslerp"]


def recipe(method: str, base: Path, experts: list[Path], dtype: str) -> dict:
    """A mergekit-format recipe of `method` (the parameters a model card would give it)."""
    if method in ("slerp", "nuslerp"):
        weight = {"parameters": {"weight": 0.5}} if method == "nuslerp" else {}
        models = [{"model": str(p), **weight} for p in (base, experts[0])]
        head = {"base_model": str(base), "parameters": {"t": 0.5}} if method == "slerp" else {}
        body = {"merge_method": method, **head, "models": models}
    else:
        per = {"della": {"weight": 1.0, "density": 0.3, "epsilon": 0.1}}.get(method.split("_")[0], {})
        models = [{"model": str(e), **({"parameters": per} if per else {})} for e in experts]
        body = {"merge_method": method, "base_model": str(base), "models": models}
        if method.startswith("della"):
            body["parameters"] = {"normalize": True, "lambda": 1.0}
        elif method == "sce":
            body["parameters"] = {"select_topk": 0.3}
    return {**body, "dtype": dtype, "out_dtype": "bfloat16"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", action="store_true", help="also time mergekit once per recipe")
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench-data")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/more-methods")
    args = ap.parse_args(argv)
    spec = gen_models.spec_from_args(gen_models.build_parser().parse_args(["x", "--preset", "qwen0.5b"]))
    base, *experts = gen_models.generate(args.data_dir / "qwen0.5b", spec, 3)
    work = args.data_dir / "more-runs"
    shutil.rmtree(work, ignore_errors=True)
    rows, runs = [], []
    mk = mergekit_env.ensure()[0] if args.mergekit else None
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            path = write_yaml(recipe(method, base, experts, dtype), work / f"{method}-{dtype}.yaml")
            tools = [("merge-cli", args.repeats)] + ([("mergekit", 1)] if mk else [])
            for tool, n in tools:
                got = []
                for r in range(n):
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = (
                        merge_cli_cmd(REPO / ".venv/bin/merge-cli", path, out)
                        if tool == "merge-cli"
                        else mergekit_cmd(mk, path, out)
                    )
                    res = measure(cmd, log=work / f"{method}-{dtype}-{tool}-{r}.log")
                    kernels = ""
                    if tool == "merge-cli" and (out / "merge_report.json").exists():
                        kernels = json.loads((out / "merge_report.json").read_text())["engine"]["kernels"]
                    runs.append(
                        {"method": method, "dtype": dtype, "tool": tool, "kernels": kernels, **res.as_dict()}
                    )
                    got.append(res)
                    print(f"{method:<13} {dtype:<9} {tool:<9} {res.wall_s:7.1f} s {res.peak_rss_gb:5.2f} GB "
                          f"cpu {res.cpu_s:6.1f} {'ok' if res.ok else 'FAILED'} {kernels}", flush=True)  # fmt: skip
                    shutil.rmtree(out, ignore_errors=True)
                ok = [g for g in got if g.ok]
                if ok:
                    rows.append(
                        f"| {method} | `dtype: {dtype}` | {tool} | {statistics.median(g.wall_s for g in ok):.1f} | "
                        f"{statistics.median(g.peak_rss_gb for g in ok):.2f} | "
                        f"{statistics.median(g.cpu_s for g in ok):.0f} | {len(ok)} |"
                    )
    table = "| method | recipe | tool | wall s | peak RSS GB | CPU s | runs |\n|---|---|---|---:|---:|---:|---:|\n"
    table += "\n".join(rows) + "\n"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "latest.md").write_text(table)
    (args.results / "latest.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(table)
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
