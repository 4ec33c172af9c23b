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
import shutil
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


def scale_rows(work: Path, hidden: int, layers: int, steps: int) -> list[str]:
    """Time and memory of a tune at a larger shape (random fine-tune-like experts; accuracy meaningless):
    the printed memory bound against the measured peak RSS, and seconds per step."""
    import json
    import random

    from merge_cli.demo import fine_tune_like, llama_state_dict, save_hf

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 8000, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }  # fmt: skip
    root = work / "scale"
    base = llama_state_dict(cfg, torch.Generator().manual_seed(0))
    save_hf(root / "base", base, cfg, dtype=torch.float32)
    for k in range(2):
        save_hf(
            root / f"e{k}",
            fine_tune_like(base, torch.Generator().manual_seed(k + 1)),
            cfg,
            dtype=torch.float32,
        )
    params = sum(v.numel() for v in base.values())
    del base
    (root / "base" / "tokenizer.json").unlink()  # token ids in the data instead
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(8000) for _ in range(128)], "task": f"t{i % 2}"} for i in range(32)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "r.yaml").write_text(
        "method: task_arithmetic\nbase_model: base\nmodels: [e0, e1]\nparameters: {weight: 0.3}\n"
    )
    cmd = ["tune", root / "r.yaml", root / "t.yaml", "--data", root / "data.jsonl", "--steps", steps,
           "--batch", "4", "--device", "cpu"]  # fmt: skip
    r = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "merge_cli", *map(str, cmd)], capture_output=True, text=True,
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "COLUMNS": "400"},
    )  # fmt: skip
    if r.returncode != 0:
        sys.exit(r.stderr[-2000:])
    bound = re.search(r"memory bound about ([\d.]+ [KMG]B) \(([^)]*)\)", " ".join(r.stdout.split()))
    loop = float(re.search(r" in \d+ step\(s\), ([\d.]+) s;", r.stdout).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    return [
        f"| {params / 1e6:.0f}M params (hidden {hidden}, {layers} layers, vocab 8000), K = 2, fp32, "
        f"2 tasks x 4 x 128 tokens | {bound.group(1)} ({bound.group(2)}) | {rss:.0f} MB | "
        f"{loop / steps:.2f} s |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tune.md"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--scale-hidden", type=int, default=512, help="hidden size of the timing/memory row (0: skip)"
    )
    ap.add_argument("--scale-layers", type=int, default=8)
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
    tuned.append(
        ("tuned task-wise (nll on 64 labelled pairs, self-positioning)", "r0.yaml", "self-positioning")
    )
    for k, (label, start, gran) in enumerate(tuned):
        out = work / f"t{k}.yaml"
        how = (
            ["--data", work / "nll_data.jsonl", "--preset", gran]
            if gran == "self-positioning"
            else ["--data", work / "tune_data.jsonl", "--granularity", gran, "--entropy-on", "last"]
        )
        cost = cli(
            "tune", work / start, out, *how, "--steps", args.steps, "--lr", "0.01", "--batch", "8",
            "--device", "cpu", "-q", timed=True,
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
    if args.scale_hidden:
        lines += [
            "",
            "Time and memory at a larger shape (random fine-tune-like experts, 5 steps, layer-wise, OMP_NUM_THREADS=1):",
            "",
            "| shape | printed bound | measured peak RSS (whole process) | s per step |",
            "|---|---|---|---|",
            *scale_rows(work, args.scale_hidden, args.scale_layers, 5),
        ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
