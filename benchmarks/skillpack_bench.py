"""SkillPack benchmark (issue 16): pack size vs the full delta, reconstruction error per module group,
extract and apply wall time and peak RSS, for several beta, against a same-size fixed-rank SVD LoRA.

    python benchmarks/skillpack_bench.py [OUT=bench-data/skillpack] [--preset qwen0.5b] [--layers N]
                                         [--betas 0.5,0.8,0.95]

--layers keeps the preset's tensor shapes (hidden, intermediate, vocabulary) with fewer layers: per-module
sizes and errors are those of the full model, times and sizes scale about linearly with the layer count.

Models: the base from gen_models.py (the 0.5B shape by default, bf16); the expert is written here, because
gen_models' experts carry i.i.d. noise deltas (a flat spectrum, the worst case for any low-rank method)
while fine-tune deltas concentrate their energy in few directions. Expert = base + delta with, per matrix,
a rank-64 part with singular values ~ 1/i plus i.i.d. noise holding 10% of the delta's energy, scaled to
5% of the tensor's RMS; embeddings get a delta on 5% of the token rows plus small noise; norms small noise.

The LoRA baseline is what mergekit-extract-lora does for the projections: one fixed rank r for every
attention and MLP matrix, factors in bf16, no quantization; r is chosen so those bytes match the pack's
attention + MLP bytes (embeddings and norms are packed the same way in both, so only the projection
compression differs). It is measured with `pack extract --rank r --bands 16:rest` (the same code path, so
the error numbers are comparable). Each command runs under /usr/bin/time -v (wall clock, maximum resident set size).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_models  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_expert(base: Path, out: Path, seed: int = 1) -> None:
    if (out / ".complete").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118
                w = st.get_tensor(name)
                wf = w.float()
                rms = float(wf.pow(2).mean().sqrt())
                if w.dim() == 2 and "embed" not in name:
                    m, n = w.shape
                    r = 64
                    a = torch.randn(m, r, generator=g) / m**0.5
                    b = torch.randn(r, n, generator=g) / n**0.5
                    s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
                    low = (a * s) @ b
                    noise = torch.randn(m, n, generator=g)
                    noise *= (0.1 / 0.9) ** 0.5 * low.norm() / noise.norm()
                    d = low + noise
                elif w.dim() == 2:
                    d = torch.randn(w.shape, generator=g) * 0.05
                    rows = torch.rand(w.shape[0], generator=g) < 0.05
                    d[rows] *= 20
                else:
                    d = torch.randn(w.shape, generator=g)
                d *= 0.05 * rms / float(d.pow(2).mean().sqrt())
                tensors[name] = (wf + d).to(w.dtype)
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
    for side in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (base / side).is_file():
            (out / side).write_bytes((base / side).read_bytes())
    (out / ".complete").write_text("1\n")


def timed(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"seconds": round(wall, 2), "peak_rss_bytes": rss}


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "merge_cli", *map(str, args)]


def inspect(pack: Path) -> dict:
    p = subprocess.run(cli("pack", "inspect", pack, "--json"), capture_output=True, text=True, check=True)
    info = json.loads(p.stdout)
    return {
        "bytes": info["bytes"],
        "full_delta_bytes": info["full_delta_bytes"],
        "ratio": round(info["compression_ratio"], 2),
        "rel_error": round(info["rel_error"], 4),
        "groups": {
            g["group"]: {
                "rel_error": round(g["rel_error"], 4),
                "bytes": g["bytes"],
                "rank": [g["rank_min"], g["rank_max"]],
            }
            for g in info["groups"]
        },  # fmt: skip
    }


def lora_rank_for(base: Path, target_bytes: int) -> int:
    """Rank r whose bf16 factors over all attention and MLP matrices take about target_bytes."""
    from merge_cli.modules import group_of

    per_rank = 0
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118
                shape = st.get_slice(name).get_shape()
                if len(shape) == 2 and group_of(name) in ("attention", "mlp"):
                    per_rank += 2 * (shape[0] + shape[1]) + 4  # bf16 factors + the fp32 singular value
    return max(1, round(target_bytes / per_rank))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=ROOT / "bench-data" / "skillpack")
    ap.add_argument("--preset", default="qwen0.5b", choices=sorted(gen_models.PRESETS))
    ap.add_argument("--layers", type=int, help="fewer layers than the preset (same tensor shapes)")
    ap.add_argument("--betas", default="0.5,0.8,0.95")
    ap.add_argument("--max-memory", default="8GB", help="passed to pack extract / apply")
    ap.add_argument("--no-lora", action="store_true", help="skip the fixed-rank LoRA baseline")
    args = ap.parse_args()
    shape = dict(gen_models.PRESETS[args.preset])
    if args.layers:
        shape["layers"] = args.layers
    spec = gen_models.Spec(**shape)
    tag = f"{args.preset}-{spec.layers}l"
    base = gen_models.generate(args.out / tag, spec, 0)[0]
    expert = args.out / tag / "expert_lowrank"
    make_expert(base, expert)
    results = {"preset": args.preset, "layers": spec.layers, "runs": []}
    for beta in [float(b) for b in args.betas.split(",")]:
        pack = args.out / f"beta{beta}.skillpack"
        row = {"setting": f"skillpack beta={beta}"}
        row["extract"] = timed(cli("pack", "extract", base, expert, pack, "--beta", beta, "-q", "--overwrite",
                                   "--max-memory", args.max_memory))  # fmt: skip
        row.update(inspect(pack))
        graft = args.out / "graft"
        row["apply"] = timed(cli("pack", "apply", base, pack, graft, "-q", "--overwrite", "--max-memory",
                                 args.max_memory))  # fmt: skip
        subprocess.run(["rm", "-rf", str(graft)], check=True)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if not args.no_lora:
            proj = sum(row["groups"][g]["bytes"] for g in ("attention", "mlp") if g in row["groups"])
            r = lora_rank_for(base, proj)
            lp = args.out / f"lora_r{r}.skillpack"
            lrow = {"setting": f"fixed-rank LoRA r={r} (bf16 projections, same size as beta={beta})"}
            lrow["extract"] = timed(cli("pack", "extract", base, expert, lp, "--rank", r, "--bands", "16:rest",
                                        "-q", "--overwrite", "--max-memory", args.max_memory))  # fmt: skip
            lrow.update(inspect(lp))
            results["runs"].append(lrow)
            print(json.dumps(lrow), flush=True)
            lp.unlink()
        pack.unlink()
    dest = ROOT / "benchmarks" / "results" / f"skillpack-{tag}.json"
    dest.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
