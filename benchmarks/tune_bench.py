"""Figures for `merge-cli tune` (issue 17) on the synthetic benchmark (merge_cli/tune/synthetic.py).

    PYTHONPATH=. .venv/bin/python benchmarks/tune_bench.py [--out benchmarks/results/tune.md] [--steps 60]

Builds a tiny Llama base and two experts fine-tuned on distinct symbol-mapping tasks, then reports held-out
per-task accuracy of: each expert, task arithmetic (weights 0.3), TIES (density 0.5, weights 1), and the
tuned recipes (entropy objective on unlabeled prompts: task-wise, layer-wise, layer-wise from TIES = ++),
each tuned recipe rebuilt by `merge-cli run` from the recipe alone. Every `merge-cli tune` runs under
/usr/bin/time -v: wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merge_cli.tune import synthetic as S  # noqa: E402


def cli(*args, timed=False):
    cmd = [sys.executable, "-m", "merge_cli", *map(str, args)]
    if timed:
        cmd = ["/usr/bin/time", "-v", *cmd]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    if not timed:
        return None
    loop = float(re.search(r" in \d+ step\(s\), ([\d.]+) s;", r.stdout).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return h * 3600 + m * 60 + s, rss / 1024, loop


def accuracy_of(folder: Path) -> list[float]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    model = S.load(state)
    return [S.accuracy(model, t) for t in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tune.md"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    S.build(work)
    models = [{"model": f"expert_{t}", "name": t} for t in S.TASKS[:2]]
    recipes = {
        "task arithmetic (w 0.3)": {"method": "task_arithmetic", "parameters": {"weight": 0.3}},
        "TIES (density 0.5, mean, w 1)": {"method": "ties", "parameters": {"weight": 1.0, "density": 0.5}},
        "TIES (density 0.5, sum, w 0.3)": {
            "method": "ties",
            "parameters": {"weight": 0.3, "density": 0.5, "merge_func": "sum"},
        },
    }
    rows = []
    for t in S.TASKS[:2]:
        rows.append((f"expert {t} (reference)", accuracy_of(work / f"expert_{t}"), None))
    for k, (label, r) in enumerate(recipes.items()):
        path = work / f"r{k}.yaml"
        path.write_text(yaml.safe_dump({"base_model": "base", "models": models, **r}))
        cli("run", path, work / f"m{k}", "-q")
        rows.append((label, accuracy_of(work / f"m{k}"), None))
    tuned = [
        ("tuned task-wise (entropy)", "r0.yaml", "task"),
        ("tuned layer-wise (entropy)", "r0.yaml", "layer"),
        ("tuned block-wise (entropy)", "r0.yaml", "block"),
        ("tuned layer-wise++ (from TIES sum, w 0.3)", "r2.yaml", "layer"),
    ]
    for k, (label, start, gran) in enumerate(tuned):
        out = work / f"t{k}.yaml"
        cost = cli(
            "tune", work / start, out, "--data", work / "tune_data.jsonl", "--granularity", gran, "--steps",
            args.steps, "--lr", "0.01", "--batch", "8", "--entropy-on", "last", "--device", "cpu", "-q",
            timed=True,
        )  # fmt: skip
        cli("run", out, work / f"tm{k}", "-q")
        rows.append((label, accuracy_of(work / f"tm{k}"), cost))
    lines = [
        f"# merge-cli tune on the synthetic benchmark ({args.steps} steps, lr 0.01, batch 8/task, entropy on "
        "the last prompt token, 64 unlabeled prompts, OMP_NUM_THREADS=1)",
        "",
        "Held-out accuracy (256 fresh prompts per task; chance 1/16). Tuned rows: the tuned recipe rebuilt by "
        "`merge-cli run`; time and peak RSS of `merge-cli tune` (/usr/bin/time -v: process start, imports, model build, data, "
        "writing and re-planning the recipe included) and the time of its optimizer steps.",
        "",
        "| model | task t0 | task t1 | mean | tune wall s | of which steps s | tune peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, acc, cost in rows:
        c = f"{cost[0]:.1f} | {cost[2]:.1f} | {cost[1]:.0f}" if cost else "- | - | -"
        lines.append(f"| {label} | {acc[0]:.3f} | {acc[1]:.3f} | {sum(acc) / 2:.3f} | {c} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
