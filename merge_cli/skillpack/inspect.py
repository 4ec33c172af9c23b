"""`pack inspect`: a pack's size, compression ratio, and per-group / per-tensor scheme, rank, bits and error."""

from __future__ import annotations

import math
from pathlib import Path

from merge_cli.modules import GROUPS
from merge_cli.skillpack.format import Pack, full_delta_bytes


def _bits(e: dict) -> str:
    if e["scheme"] == "svd":
        return "/".join(f"{b['bits']}x{b['stop'] - b['start']}" for b in e["bands"]) or "-"
    if e["scheme"] == "prune":
        return f"keep {e['keep']:g}"
    return "fp32" if e["scheme"] == "dense" else "-"


def _group_bits(e: dict) -> set[str]:
    if e["scheme"] == "svd":
        return {
            f"int{b['bits']}" if b["bits"] <= 8 else {16: "bf16", 32: "fp32"}[b["bits"]] for b in e["bands"]
        }
    if e["scheme"] == "prune":
        return {f"keep {e['keep']:g}"}
    return {"fp32"} if e["scheme"] == "dense" else set()


def _bits_order(text: str) -> tuple:
    digits = "".join(c for c in text if c.isdigit())
    return (-int(digits) if digits else 0, text)


def summarize(path: Path) -> dict:
    pack = Pack(Path(path))
    try:
        per_key = {k: i.nbytes for k, i in pack.st.tensors.items()}
        rows, groups = [], {}
        for name, e in pack.tensors.items():
            nbytes = sum(v for k, v in per_key.items() if k.startswith(name + "::"))
            row = {"tensor": name, "group": e.get("group", "other"), "scheme": e["scheme"],
                   "shape": e["shape"], "rank": e.get("rank"), "bits": _bits(e), "bytes": nbytes,
                   "rel_error": e.get("rel_error", 0.0), "delta_norm": e.get("delta_norm", 0.0)}  # fmt: skip
            rows.append(row)
            g = groups.setdefault(row["group"], {"tensors": 0, "schemes": set(), "ranks": [], "bits": set(),
                                                 "bytes": 0, "err_sq": 0.0, "norm_sq": 0.0})  # fmt: skip
            g["tensors"] += 1
            g["schemes"].add(e["scheme"])
            if e.get("rank") is not None:
                g["ranks"].append(e["rank"])
            g["bits"].update(_group_bits(e))
            g["bytes"] += nbytes
            g["full_bytes"] = g.get("full_bytes", 0) + full_delta_bytes({name: e})
            g["err_sq"] += (row["rel_error"] * row["delta_norm"]) ** 2
            g["norm_sq"] += row["delta_norm"] ** 2
        table = []
        for name in sorted(groups, key=lambda g: GROUPS.index(g) if g in GROUPS else 99):
            g = groups[name]
            table.append({
                "group": name, "tensors": g["tensors"], "schemes": sorted(g["schemes"]),
                "rank_min": min(g["ranks"]) if g["ranks"] else None, "rank_max": max(g["ranks"]) if g["ranks"] else None,
                "bits": sorted(g["bits"], key=_bits_order), "bytes": g["bytes"], "full_delta_bytes": g["full_bytes"],
                "rel_error": math.sqrt(g["err_sq"] / g["norm_sq"]) if g["norm_sq"] else 0.0,
            })  # fmt: skip
        size = pack.nbytes
        delta = pack.meta.get("totals", {}).get("delta_bytes") or full_delta_bytes(pack.tensors)
        err_sq = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)
        norm_sq = sum(r["delta_norm"] ** 2 for r in rows)
        return {
            "path": str(path), "version": pack.meta["version"], "bytes": size, "full_delta_bytes": delta,
            "compression_ratio": delta / size if size else None,
            "rel_error": math.sqrt(err_sq / norm_sq) if norm_sq else 0.0,
            "base": {k: v for k, v in (pack.meta.get("base") or {}).items() if k != "files"},
            "base_files": (pack.meta.get("base") or {}).get("files"),
            "source": (pack.meta.get("source") or {}).get("ref"),
            "created_by": pack.meta.get("created_by"), "groups": table, "tensors": rows,
        }  # fmt: skip
    finally:
        pack.close()


def print_summary(info: dict, console, per_tensor: bool = False) -> None:
    from rich.table import Table

    console.print(f"SkillPack {info['path']} (format v{info['version']}, {info['created_by']})")
    console.print(f"  base {info['base'].get('ref')}  source {info['source']}")
    console.print(f"  {info['bytes'] / 1e6:.2f} MB; full delta {info['full_delta_bytes'] / 1e6:.2f} MB: "
                  f"{info['compression_ratio']:.1f}x smaller; overall relative error {info['rel_error']:.4f}")  # fmt: skip
    if per_tensor:
        t = Table("tensor", "scheme", "rank", "bits", "MB", "rel. error")
        for r in info["tensors"]:
            t.add_row(r["tensor"], r["scheme"], str(r["rank"] if r["rank"] is not None else "-"), r["bits"],
                      f"{r['bytes'] / 1e6:.3f}", f"{r['rel_error']:.4f}")  # fmt: skip
    else:
        t = Table("group", "tensors", "scheme", "rank", "bits", "MB", "ratio", "error")
        for g in info["groups"]:
            rank = "-" if g["rank_min"] is None else (
                str(g["rank_min"]) if g["rank_min"] == g["rank_max"] else f"{g['rank_min']}-{g['rank_max']}")  # fmt: skip
            t.add_row(g["group"], str(g["tensors"]), ",".join(g["schemes"]), rank, ",".join(g["bits"]) or "-",
                      f"{g['bytes'] / 1e6:.3f}", f"{g['full_delta_bytes'] / max(g['bytes'], 1):.1f}",
                      f"{g['rel_error']:.4f}")  # fmt: skip
    console.print(t)
