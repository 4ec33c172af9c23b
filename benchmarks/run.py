"""Speed and memory benchmark: merge-cli against mergekit and the I/O floor (``make bench``).

Generates the benchmark models if needed (``bench-data/<preset>/``), installs mergekit into
``.venv-mergekit/`` if needed, then for each repeat and method runs every tool on the same inputs
(alternating the tool order between repeats), plus the I/O floor once per repeat. Each run is a separate
process measured by ``harness.measure`` (wall time, peak RSS summed over the process tree). Outputs are
deleted after each run unless ``--keep-outputs``. Writes ``benchmarks/results/latest.md`` and ``.json``.

    .venv/bin/python benchmarks/run.py                                # qwen0.5b, base + 3 experts, 3 repeats
    .venv/bin/python benchmarks/run.py --methods linear,ties:density=0.3 --repeats 1 --tools mergekit
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import gen_models
import mergekit_env
from harness import (
    Measurement,
    Method,
    measure,
    merge_cli_cmd,
    mergekit_cmd,
    mergekit_recipe,
    native_recipe,
    write_yaml,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = "linear,task_arithmetic,ties:density=0.3,dare_ties:density=0.3,breadcrumbs_ties"
FLOOR = "io-floor"


def machine_info() -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(mem * 1024 / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_version(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return (proc.stdout or proc.stderr).strip().splitlines()[-1] if proc.returncode == 0 else "?"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict], methods: list[str], tools: list[str]) -> list[dict]:
    """One row per (method, tool) with medians and ratios against mergekit and the floor."""

    def med(method: str, tool: str, key: str) -> float | None:
        return median([r[key] for r in runs if r["method"] == method and r["tool"] == tool and r["ok"]])

    floor_wall = med(FLOOR, FLOOR, "wall_s")
    rows = []
    if floor_wall is not None:
        rows.append(
            dict(
                method=FLOOR,
                tool="safetensors",
                wall=floor_wall,
                rss=med(FLOOR, FLOOR, "peak_rss_gb"),
                cpu=med(FLOOR, FLOOR, "cpu_s"),
                anon=med(FLOOR, FLOOR, "peak_anon_gb"),
                load=med(FLOOR, FLOOR, "load"),
            )
        )
    for m in methods:
        for t in tools:
            n_ok = sum(1 for r in runs if r["method"] == m and r["tool"] == t and r["ok"])
            n = sum(1 for r in runs if r["method"] == m and r["tool"] == t)
            row = dict(method=m, tool=t, wall=med(m, t, "wall_s"), rss=med(m, t, "peak_rss_gb"), ok=n_ok, n=n)
            row["cpu"], row["anon"] = med(m, t, "cpu_s"), med(m, t, "peak_anon_gb")
            row["load"] = med(m, t, "load")
            mk_wall, mk_rss = med(m, "mergekit", "wall_s"), med(m, "mergekit", "peak_rss_gb")
            if t != "mergekit" and row["wall"] and mk_wall:
                row["vs_mk_time"], row["vs_mk_rss"] = row["wall"] / mk_wall, row["rss"] / mk_rss
            if row["wall"] and floor_wall:
                row["vs_floor"] = row["wall"] / floor_wall
            rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    def f(v: float | None, fmt: str = "{:.2f}") -> str:
        return "—" if v is None else fmt.format(v)

    lines = [
        f"Benchmark {meta['machine']['date']}: preset `{meta['preset']}` (base + {meta['experts']} experts), "
        f"{meta['repeats']} repeat(s), medians. Machine: {meta['machine']['nproc']} cores "
        f"({meta['machine']['cpu']}), {meta['machine']['mem_gb']} GB RAM; page cache "
        f"{meta.get('page_cache', 'warm')}.",
        "",
        "| method | tool | median wall s | median peak RSS GB (anon) | CPU s | vs mergekit (time, RSS) | vs I/O floor (time) | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_mk = f"{r['vs_mk_time']:.2f}x, {r['vs_mk_rss']:.2f}x" if "vs_mk_time" in r else "—"
        status = "" if r.get("ok", 1) == r.get("n", 1) else f" ({r['ok']}/{r['n']} ok)"
        vs_floor = f"{r['vs_floor']:.1f}x" if "vs_floor" in r else "—"
        lines.append(
            f"| {r['method']} | {r['tool']}{status} | {f(r['wall'], '{:.1f}')} | {f(r['rss'])} ({f(r.get('anon'))}) | "
            f"{f(r.get('cpu'), '{:.0f}')} | {vs_mk} | {vs_floor} | {f(r.get('load'), '{:.1f}')} |"
        )
    lines += [
        "",
        "Peak RSS: sum of RSS over the whole process tree, sampled from /proc every 50 ms; in parentheses its",
        "anonymous part (RSS minus resident file-backed pages such as mmapped inputs). CPU s: user + system.",
        "load: median over the runs of the 1-minute load average (the larger of before and after each run).",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(gen_models.PRESETS), default="qwen0.5b")
    ap.add_argument("--experts", type=int, default=3, help="fine-tuned variants besides the base (default 3)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of name[:key=value...]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="mergekit,merge-cli", help="comma list of mergekit, merge-cli")
    ap.add_argument("--no-floor", action="store_true", help="skip the I/O floor")
    ap.add_argument(
        "--floor-fsync",
        action="store_true",
        help="the floor flushes its shards to the disk (as merge-cli does)",
    )
    ap.add_argument("--mergekit-extra-args", default="", help="e.g. '--cuda' (one shell-quoted string)")
    ap.add_argument("--merge-cli-extra-args", default="")
    ap.add_argument("--merge-cli-format", choices=["native", "mergekit"], default="native")
    ap.add_argument(
        "--mergekit-dtype",
        default="bfloat16",
        help="mergekit's compute dtype (default bfloat16; none: omit the key)",
    )
    ap.add_argument(
        "--merge-cli", type=Path, default=REPO / ".venv/bin/merge-cli", help="merge-cli executable"
    )
    ap.add_argument("--data-dir", type=Path, default=REPO / "bench-data")
    ap.add_argument(
        "--results",
        type=Path,
        default=REPO / "benchmarks/results",
        help="folder for latest.md and latest.json",
    )
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every timed run (sync; echo 3 > /proc/sys/vm/drop_caches; needs root)",
    )
    return ap


def drop_page_cache() -> None:
    """Cold page cache: every input is read from the disk again (needs write access to drop_caches)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    methods = [Method.parse(m) for m in args.methods.split(",") if m.strip()]
    unknown = set(tools) - {"mergekit", "merge-cli"}
    if unknown:
        raise SystemExit(f"unknown tool(s): {', '.join(sorted(unknown))}")

    spec = gen_models.spec_from_args(gen_models.build_parser().parse_args(["x", "--preset", args.preset]))
    base, *experts = gen_models.generate(args.data_dir / args.preset, spec, args.experts)
    work = args.data_dir / "runs"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)

    exes: dict[str, Path] = {}
    versions: dict[str, str] = {}
    if "mergekit" in tools:
        exe, install_s = mergekit_env.ensure()
        if install_s:
            print(f"installed mergekit {mergekit_env.MERGEKIT_VERSION} in {install_s:.0f} s", file=sys.stderr)
        exes["mergekit"] = exe
        versions["mergekit"] = mergekit_env.MERGEKIT_VERSION
    if "merge-cli" in tools:
        if not args.merge_cli.exists():
            print(
                f"merge-cli not found at {args.merge_cli} (run `make install`); skipping it", file=sys.stderr
            )
            tools.remove("merge-cli")
        else:
            exes["merge-cli"] = args.merge_cli
            versions["merge-cli"] = tool_version([str(args.merge_cli), "--version"])

    recipes: dict[tuple[str, str], Path] = {}
    for m in methods:
        mk = mergekit_recipe(m, base, experts, dtype=args.mergekit_dtype)
        recipes[m.label, "mergekit"] = write_yaml(mk, work / "recipes" / f"{m.slug}.mergekit.yaml")
        mc = native_recipe(m, base, experts) if args.merge_cli_format == "native" else mk
        recipes[m.label, "merge-cli"] = write_yaml(mc, work / "recipes" / f"{m.slug}.merge-cli.yaml")

    def command(tool: str, recipe: Path, out: Path) -> list[str]:
        if tool == "mergekit":
            return mergekit_cmd(exes[tool], recipe, out, shlex.split(args.mergekit_extra_args))
        if tool == "merge-cli":
            return merge_cli_cmd(exes[tool], recipe, out, shlex.split(args.merge_cli_extra_args))
        floor = [sys.executable, str(Path(__file__).parent / "io_floor.py"), str(out)]
        return floor + [str(p) for p in (base, *experts)] + (["--fsync"] if args.floor_fsync else [])

    runs: list[dict] = []
    failed: set[tuple[str, str]] = set()

    def run_one(label: str, tool: str, r: int) -> None:
        if (label, tool) in failed:
            return
        out = work / "out" / f"{label.replace(':', '_')}.{tool}"
        log = work / "logs" / f"{label.replace(':', '_')}.{tool}.{r}.log"
        shutil.rmtree(out, ignore_errors=True)
        if args.cold:
            drop_page_cache()
        load = os.getloadavg()[0]  # the machine may be shared: the 1-minute load beside every figure
        res: Measurement = measure(command(tool, recipes.get((label, tool)), out), log=log)
        load = max(load, os.getloadavg()[0])
        ok = res.ok and any(out.glob("*.safetensors"))
        runs.append({"method": label, "tool": tool, "repeat": r, "ok": ok, "load": load, **res.as_dict()})
        note = "" if ok else f"  FAILED (rc={res.returncode}, see {log})"
        print(
            f"[{r + 1}/{args.repeats}] {label:<40} {tool:<9} {res.wall_s:7.1f} s  {res.peak_rss_gb:5.2f} GB"
            f"  load {load:.1f}{note}",
            flush=True,
        )
        if not ok:
            failed.add((label, tool))
            print("    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-8:]), file=sys.stderr)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        os.sync()  # flush dirty pages now so that writeback does not bleed into the next run

    if not args.no_floor and not args.cold:  # untimed warm-up: every run then reads from a warm page cache
        subprocess.run(command(FLOOR, None, work / "out" / "warmup"), check=True, capture_output=True)
        shutil.rmtree(work / "out" / "warmup", ignore_errors=True)
    for r in range(args.repeats):
        if not args.no_floor:
            run_one(FLOOR, FLOOR, r)
        order = tools if r % 2 == 0 else tools[::-1]
        for m in methods:
            for tool in order:
                run_one(m.label, tool, r)

    meta = {
        "preset": args.preset,
        "experts": args.experts,
        "repeats": args.repeats,
        "machine": machine_info(),
        "versions": versions,
        "merge_cli_format": args.merge_cli_format,
        "mergekit_dtype": args.mergekit_dtype,
        "page_cache": "cold (dropped before every run)" if args.cold else "warm",
        "commands": {
            f"{k[0]} / {k[1]}": command(k[1], v, Path("OUT")) for k, v in recipes.items() if k[1] in exes
        },
    }
    rows = summarize(runs, [m.label for m in methods], tools)
    table = markdown(rows, meta)
    print("\n" + table)
    if args.results.suffix in (".json", ".md"):  # a file was named: write beside it, not fail at the end
        args.results = args.results.parent
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "latest.md").write_text(table)
    (args.results / "latest.json").write_text(
        json.dumps({**meta, "summary": rows, "runs": runs}, indent=2) + "\n"
    )
    print(f"wrote {args.results / 'latest.md'} and latest.json", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
