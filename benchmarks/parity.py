"""Parity of merge-cli with mergekit 0.1.5 on the same mergekit recipes (`make parity`; not part of `make test`).

Generates a small Llama family (base + 3 fine-tune-like experts, ~2.7M parameters each, one expert sharded)
in fp32 and in bf16 (recipes then say `dtype: bfloat16`), writes each case's mergekit recipe once, runs it through `mergekit-yaml` (a black box
in its own virtual environment, `.venv-mergekit/`, see mergekit_env.py) and through `merge-cli run`
(which reads the very same mergekit-format file), then compares every output tensor:

- deterministic methods: the fraction of elements equal within one rounding step (ulp) of the output
  dtype at that magnitude; flips = elements further apart. Pass: >= 99.99 % and the same tensor names
  ("1 ulp", or "bitwise"), or else >= 99.99 % within 4 ulps at the magnitude of the inputs ("rounding":
  slerp-like formulas whose sin/arccos coefficients numpy and torch round differently, see compare_exact).
  When the two tools write a tensor in different dtypes (mergekit's arcee_fusion and ramplus_tl write
  float32 under `dtype: bfloat16`), both are rounded to the coarser dtype first and the row is marked (‡).
- random methods (DARE/DELLA: different random generators by design): per tensor, the kept fraction
  (elements that differ from the base) and the norm of the merged delta; pass when the kept fractions
  agree within 5 sampling standard deviations and the delta norms within 2 %.

Rows `bfloat16-asis` (bf16 checkpoints, recipes without `dtype`: mergekit computes in bf16, merge-cli in
fp32, a chosen difference) go to a table of their own and do not count towards the pass/fail exit code;
a row there that misses the bar reads "differs (fp32 compute)" (a crash or a tensor-name mismatch still fails).

Writes .parity/<dtype>/... and prints the markdown tables (also saved to .parity/parity.md and .json).

    python benchmarks/parity.py [--dtypes float32,bfloat16,bfloat16-asis] [--cases ties,linear]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_cli.demo import TINY_CONFIG, fine_tune_like, llama_state_dict, save_hf  # noqa: E402
from merge_cli.methods import METHODS  # noqa: E402

CONFIG = {**TINY_CONFIG, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 512}  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}

# (case id, mergekit method, random?, recipe). {B} base, {E0} {E1} {E2} experts.
CASES: list[tuple[str, str, bool, str]] = [
    (
        "linear",
        "linear",
        False,
        """
merge_method: linear
models:
  - {model: "{E0}", parameters: {weight: 0.5}}
  - {model: "{E1}", parameters: {weight: [0.2, 0.8]}}
  - {model: "{E2}", parameters: {weight: [{filter: mlp, value: 0.7}, {value: 0.1}]}}
""",
    ),
    (
        "linear_slices",
        "linear",
        False,
        """
merge_method: linear
slices:
  - sources:
      - {model: "{E0}", layer_range: [0, 2], parameters: {weight: [1.0, 0.0]}}
      - {model: "{E1}", layer_range: [1, 3], parameters: {weight: 0.5}}
  - sources:
      - {model: "{E2}", layer_range: [3, 4]}
      - {model: "{B}", layer_range: [3, 4]}
    parameters: {weight: [{filter: self_attn, value: 0.9}, {value: 0.3}]}
parameters: {weight: 1.0, normalize: true}
""",
    ),
    (
        "passthrough",
        "passthrough",
        False,
        """
merge_method: passthrough
slices:
  - sources: [{model: "{E0}", layer_range: [0, 3]}]
  - sources: [{model: "{E1}", layer_range: [1, 4], parameters: {scale: [{filter: o_proj, value: 0.0}, {value: 1.0}]}}]
""",
    ),
    (
        "task_arithmetic",
        "task_arithmetic",
        False,
        """
merge_method: task_arithmetic
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.7}}
  - {model: "{E1}", parameters: {weight: [0.3, 0.9]}}
  - {model: "{E2}", parameters: {weight: [{filter: mlp, value: -0.4}, {value: 0.5}]}}
parameters: {lambda: 0.8}
""",
    ),
    (
        "ties",
        "ties",
        False,
        """
merge_method: ties
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.6, density: [1.0, 0.6, 0.3]}}
  - {model: "{E1}", parameters: {density: 0.5, weight: [{filter: mlp, value: 0.7}, {value: 0.2}]}}
  - {model: "{E2}", parameters: {weight: 1.0}}
parameters: {normalize: true, int8_mask: true}
""",
    ),
    (
        "ties_sum_slices",
        "ties",
        False,
        """
merge_method: ties
base_model: "{B}"
slices:
  - sources:
      - {model: "{B}", layer_range: [0, 4]}
      - {model: "{E0}", layer_range: [0, 4], parameters: {weight: 1.0, density: 0.3}}
      - {model: "{E1}", layer_range: [0, 4], parameters: {weight: 0.5, density: [0.2, 0.9]}}
parameters: {normalize: false, lambda: 1.2}
""",
    ),
    (
        "dare_linear",
        "dare_linear",
        True,
        """
merge_method: dare_linear
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.5, density: 0.4}}
  - {model: "{E1}", parameters: {weight: 0.5, density: 0.6}}
""",
    ),
    (
        "dare_ties",
        "dare_ties",
        True,
        """
merge_method: dare_ties
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.6, density: 0.5}}
  - {model: "{E1}", parameters: {weight: 0.4, density: 0.5}}
""",
    ),
    (
        "breadcrumbs",
        "breadcrumbs",
        False,
        """
merge_method: breadcrumbs
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
  - {model: "{E1}", parameters: {weight: 0.5, density: 0.8}}
""",
    ),
    (
        "breadcrumbs_ties",
        "breadcrumbs_ties",
        False,
        """
merge_method: breadcrumbs_ties
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.5, density: 0.6, gamma: 0.05}}
  - {model: "{E1}", parameters: {weight: 0.5, density: 0.8, gamma: 0.02}}
""",
    ),
    (
        "della",
        "della",
        True,
        """
merge_method: della
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}
  - {model: "{E1}", parameters: {weight: 0.5, density: 0.6}}
parameters: {lambda: 1.0}
""",
    ),
    (
        "della_linear",
        "della_linear",
        True,
        """
merge_method: della_linear
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}
  - {model: "{E1}", parameters: {weight: 0.5, density: 0.6}}
""",
    ),
    (
        "model_stock",
        "model_stock",
        False,
        """
merge_method: model_stock
base_model: "{B}"
models: [{model: "{E0}"}, {model: "{E1}"}, {model: "{E2}"}]
""",
    ),
    (
        "slerp",
        "slerp",
        False,
        """
merge_method: slerp
base_model: "{B}"
models: [{model: "{E0}"}]
parameters:
  t: [{filter: self_attn, value: [0, 0.4, 0.6, 1]}, {filter: mlp, value: [1, 0.6, 0.4, 0]}, {value: 0.5}]
""",
    ),
    (
        "nuslerp",
        "nuslerp",
        False,
        """
merge_method: nuslerp
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.3}}
  - {model: "{E1}", parameters: {weight: 0.7}}
""",
    ),
    (
        "multislerp",
        "multislerp",
        False,
        """
merge_method: multislerp
base_model: "{B}"
models:
  - {model: "{E0}", parameters: {weight: 0.3}}
  - {model: "{E1}", parameters: {weight: 0.5}}
  - {model: "{E2}", parameters: {weight: 0.2}}
""",
    ),
    (
        "karcher",
        "karcher",
        False,
        """
merge_method: karcher
models: [{model: "{E0}"}, {model: "{E1}"}, {model: "{E2}"}]
""",
    ),
    (
        "sce",
        "sce",
        False,
        """
merge_method: sce
base_model: "{B}"
models: [{model: "{E0}"}, {model: "{E1}"}, {model: "{E2}"}]
parameters: {select_topk: 0.5}
""",
    ),
    (
        "ram",
        "ram",
        False,
        """
merge_method: ram
base_model: "{B}"
models: [{model: "{E0}"}, {model: "{E1}"}]
parameters: {epsilon: 0.002}
""",
    ),
    (
        "ramplus_tl",
        "ramplus_tl",
        False,
        """
merge_method: ramplus_tl
base_model: "{B}"
models: [{model: "{E0}"}, {model: "{E1}"}]
parameters: {epsilon: 0.002}
""",
    ),
    (
        "nearswap",
        "nearswap",
        False,
        """
merge_method: nearswap
base_model: "{B}"
models: [{model: "{E0}"}]
parameters: {t: 0.001}
""",
    ),
    (
        "arcee_fusion",
        "arcee_fusion",
        False,
        """
merge_method: arcee_fusion
base_model: "{B}"
models: [{model: "{E0}"}]
""",
    ),
]


def _with_numerics_mergekit(text: str) -> str:
    """The recipe with `numerics: mergekit` in its top-level parameters (mergekit ignores the key)."""
    lines = text.rstrip().split("\n")
    for i, line in enumerate(lines):
        if line.startswith("parameters: {"):
            lines[i] = line[:-1].rstrip() + ", numerics: mergekit}"
            return "\n".join(lines) + "\n"
    return text.rstrip() + "\nparameters: {numerics: mergekit}\n"


# The TIES family's selection: by default merge-cli keeps the exact top-k with ties at the threshold broken by
# index (no sort); mergekit keeps whichever tied entries torch's unstable argsort puts first. The "+sorted"
# rows run the same recipe with `numerics: mergekit` (torch's sort order, opt-in: it costs mergekit's full
# sort). A default row that differs passes as "tie order" only when its +sorted row is bitwise: the
# elements beyond one ulp are then exactly the threshold-tied entries the two orders keep differently.
SORTED = ("ties", "ties_sum_slices", "breadcrumbs", "breadcrumbs_ties")
CASES += [(f"{c[0]}+sorted", c[1], c[2], _with_numerics_mergekit(c[3])) for c in CASES if c[0] in SORTED]


def generate(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    paths = {"B": root / "base", **{f"E{k}": root / f"expert{k}" for k in range(3)}}
    if (root / ".complete").exists():
        return paths
    cfg = {**CONFIG, "torch_dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]}
    base = llama_state_dict(cfg, torch.Generator().manual_seed(7))
    save_hf(paths["B"], base, cfg, dtype=dtype)
    for k in range(3):
        sd = fine_tune_like(base, torch.Generator().manual_seed(100 + k), scale=0.05)
        save_hf(paths[f"E{k}"], sd, cfg, dtype=dtype, shards=2 if k == 2 else 1)
    (root / ".complete").write_text("ok\n")
    return paths


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x| (x in fp32)."""
    bits = MANTISSA.get(dtype, 23)
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x), (e - 1 - bits).to(torch.int32))


def compare_exact(a: dict, b: dict, inputs: list[dict]) -> dict:
    """Strict: |a - b| <= one ulp of the output dtype at max(|a|, |b|). Input scale: one ulp (and four) at the
    magnitude of the values merged (max over the inputs too): two valid evaluations of a formula whose terms
    are much larger than its result (slerp coefficients from sin/arccos, cancellation) differ by that much."""
    total = close = close_in = close_in4 = 0
    worst, worst_name, worst_in = 0.0, "", 0.0
    dtypes: set[str] = set()
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return {"error": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
        dt = x.dtype
        if x.dtype != y.dtype:  # compared in the coarser dtype, both rounded to it (reported in the row)
            dtypes.add(f"mergekit {str(x.dtype)[6:]}, merge-cli {str(y.dtype)[6:]}")
            dt = min(x.dtype, y.dtype, key=lambda d: MANTISSA.get(d, 23))
            x, y = x.to(dt), y.to(dt)
        xf, yf = x.float(), y.float()
        both_nan = torch.isnan(xf) & torch.isnan(yf)
        diff = torch.nan_to_num((xf - yf).abs(), nan=float("inf"))
        mag = torch.maximum(xf.abs(), yf.abs())
        ok = (diff <= ulp(mag, dt)) | both_nan
        scale = torch.stack([mag] + [m[name].float().abs() for m in inputs if name in m]).amax(dim=0)
        u_in = ulp(scale, dt)
        total += x.numel()
        close += int(ok.sum())
        close_in += int(((diff <= u_in) | both_nan).sum())
        close_in4 += int(((diff <= 4 * u_in) | both_nan).sum())
        if x.numel() and bool((~both_nan).any()):
            d = float(diff[~both_nan].max())
            worst_in = max(worst_in, float((diff / u_in)[~both_nan].max()))
            if d > worst:
                worst, worst_name = d, name
    n = max(total, 1)
    strict, rounding = close / n >= 0.9999, close_in4 / n >= 0.9999
    return {"elements": total, "flips": total - close, "agree": close / n, "agree_input_scale": close_in / n,
            "agree_input_scale_4ulp": close_in4 / n, "max_ulps_input_scale": worst_in, "max_abs_diff": worst,
            "worst_tensor": worst_name, "pass": total > 0 and (strict or rounding), "dtypes": sorted(dtypes),
            "kind": "bitwise" if total == close and worst == 0 else ("1 ulp" if strict else "rounding")}  # fmt: skip


def compare_random(a: dict, b: dict, base: dict) -> dict:
    worst_k, worst_n, n_t = 0.0, 0.0, 0
    ka = kb = tot = 0
    for name in sorted(set(a) & set(b) & set(base)):
        x, y, z = a[name].float(), b[name].float(), base[name].float()
        if x.dim() < 2:
            continue
        n = x.numel()
        pa, pb = float((x != z).float().mean()), float((y != z).float().mean())
        ka, kb, tot = ka + pa * n, kb + pb * n, tot + n
        p = max(min((pa + pb) / 2, 1 - 1e-9), 1e-9)
        worst_k = max(worst_k, abs(pa - pb) / math.sqrt(2 * p * (1 - p) / n))
        na, nb = float((x - z).norm()), float((y - z).norm())
        worst_n = max(worst_n, abs(na - nb) / max(na, nb, 1e-12))
        n_t += 1
    return {"tensors": n_t, "kept_mergekit": ka / max(tot, 1), "kept_merge_cli": kb / max(tot, 1),
            "worst_kept_sigma": worst_k, "worst_norm_rel": worst_n,
            "pass": n_t > 0 and worst_k <= 5 and worst_n <= 0.02}  # fmt: skip


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"}
        ).returncode
    return rc, time.perf_counter() - t0


def tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def run_case(
    case, paths: dict, work: Path, mk_exe: Path, dtype_key: str | None = None, reuse: bool = False
) -> dict:
    cid, method, rnd, text = case
    row = {"case": cid, "method": method, "random": rnd}
    if method not in METHODS:
        return {**row, "status": "skipped: not in merge-cli"}
    recipe = text
    for k, p in paths.items():
        recipe = recipe.replace("{" + k + "}", str(p))
    if dtype_key and "\ndtype:" not in recipe:
        recipe = recipe.rstrip() + f"\ndtype: {dtype_key}\n"
    d = work / cid
    mk_out, mc_out = d / "mergekit", d / "merge-cli"
    same = (d / "recipe.yaml").is_file() and (d / "recipe.yaml").read_text() == recipe.lstrip()
    if reuse and same and (mk_out / "config.json").is_file() and (mc_out / "manifest.json").is_file():
        return {**row, **compare(row, mk_out, mc_out, paths, text)}
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "recipe.yaml").write_text(recipe.lstrip())
    rc, row["mergekit_s"] = run([str(mk_exe), str(d / "recipe.yaml"), str(mk_out), "--no-copy-tokenizer",
                                 "--no-write-model-card", "--random-seed", "0"], d / "mergekit.log")  # fmt: skip
    if rc != 0:
        return {**row, "status": f"mergekit failed: {tail(d / 'mergekit.log')}"}
    cli = [str(REPO / ".venv" / "bin" / "python"), "-m", "merge_cli", "run", str(d / "recipe.yaml"), str(mc_out),
           "-q", "--device", "cpu"]  # fmt: skip
    rc, row["merge_cli_s"] = run(cli, d / "merge-cli.log")
    if rc != 0:
        return {**row, "status": f"merge-cli failed: {tail(d / 'merge-cli.log')}"}
    return {**row, **compare(row, mk_out, mc_out, paths, text)}


def compare(row: dict, mk_out: Path, mc_out: Path, paths: dict, text: str) -> dict:
    rnd = row["random"]
    row = {}
    a, b = load_dir(mk_out), load_dir(mc_out)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return {"status": f"tensor names differ ({len(only)}, e.g. {only[0]})"}
    used = [load_dir(p) for k, p in paths.items() if "{" + k + "}" in text]
    row.update(compare_random(a, b, load_dir(paths["B"])) if rnd else compare_exact(a, b, used))
    if row.get("dtypes"):
        row["note"] = (
            "output dtypes differ (" + "; ".join(row["dtypes"]) + "): compared after rounding to the coarser"
        )
    if not row.get("pass"):
        row["status"] = "FAIL: " + row.get("error", "numbers differ")
    elif rnd:
        row["status"] = "pass (statistical)"
    else:
        row["status"] = {"bitwise": "pass (bitwise)", "1 ulp": "pass (1 ulp)"}.get(
            row["kind"], "pass (rounding)"
        )
    return row


def table(rows: list[dict]) -> str:
    """The measured rows, then (when there are any) the chosen-difference rows (bfloat16-asis) apart."""
    main = [r for r in rows if not r["dtype"].endswith("-asis")]
    asis = [r for r in rows if r["dtype"].endswith("-asis")]
    parts = [_table(main)] if main else []
    if asis:
        parts.append(
            "Chosen difference, not part of the pass criterion: bf16 checkpoints and recipes without `dtype`"
            " (mergekit computes in bf16, merge-cli in fp32 and rounds once).\n\n" + _table(asis)
        )
    return "\n\n".join(parts)


def _table(rows: list[dict]) -> str:
    out = ["| inputs | case | method | result | within 1 ulp of the output (flips) / kept fraction | within 1 / 4 ulp at the inputs' scale (max) | max abs diff / delta norm diff |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        m = s = x = ""
        if "elements" in r:
            m = f"{100 * r['agree']:.4f} % of {r['elements']:,} ({r['flips']:,})"
            s = f"{100 * r['agree_input_scale']:.4f} % / {100 * r['agree_input_scale_4ulp']:.4f} % ({r['max_ulps_input_scale']:.0f} ulp)"
            x = f"{r['max_abs_diff']:.3g}"
        elif "tensors" in r:
            m = f"mergekit {r['kept_mergekit']:.4f}, merge-cli {r['kept_merge_cli']:.4f} (worst tensor {r['worst_kept_sigma']:.1f} sd)"
            x = f"{100 * r['worst_norm_rel']:.2f} % (worst tensor)"
        status = r["status"] + (" ‡" if r.get("note") else "")
        out.append(f"| {r['dtype']} | {r['case']} | {r['method']} | {status} | {m} | {s} | {x} |")
    notes = sorted({r["note"] for r in rows if r.get("note")})
    out += [""] + [f"‡ {n}" for n in notes] if notes else []
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default="", help="comma-separated case ids (default: all)")
    ap.add_argument("--work", type=Path, default=REPO / ".parity")
    ap.add_argument(
        "--reuse", action="store_true", help="compare existing outputs of unchanged recipes again"
    )
    args = ap.parse_args()
    from mergekit_env import mergekit_yaml

    mk_exe = mergekit_yaml()
    wanted = [c for c in args.cases.split(",") if c]
    cases = [c for c in CASES if not wanted or c[0] in wanted]
    rows = []
    for dname in args.dtypes.split(","):
        # bfloat16: the recipes say `dtype: bfloat16`, so both tools compute in bf16 (mergekit computes in
        # `dtype`, and in the inputs' dtype when it is unset; merge-cli then computes in fp32):
        # bfloat16-asis runs the recipes without a dtype to show that difference
        inputs = dname.split("-")[0]
        key = inputs if inputs != "float32" and not dname.endswith("-asis") else None
        paths = generate(args.work / "models" / inputs, DTYPES[inputs])
        for case in cases:
            row = {"dtype": dname, **run_case(case, paths, args.work / dname, mk_exe, key, args.reuse)}
            if dname.endswith("-asis") and row["status"].startswith("FAIL: numbers differ"):
                row["status"] = "differs (fp32 compute)"  # the chosen difference: not a failure
            print(f"{dname:9s} {row['case']:18s} {row['status']}", flush=True)
            rows.append(row)
        for row in rows:  # default TIES-family rows that differ only in the order of threshold ties
            sib = next(
                (r for r in rows if r["dtype"] == row["dtype"] and r["case"] == row["case"] + "+sorted"), None
            )
            if row["status"] == "FAIL: numbers differ" and sib and sib["status"] == "pass (bitwise)":
                row["status"] = f"pass (tie order: {row['flips']:,} flips)"
    md = table(rows)
    print("\n" + md)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "parity.md").write_text(md + "\n")
    (args.work / "parity.json").write_text(json.dumps(rows, indent=1) + "\n")
    ran = [r for r in rows if not r["status"].startswith(("skipped", "differs (fp32 compute)"))]
    return 0 if all(r["status"].startswith("pass") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
