"""The SkillPack step of `make demo`: extract two packs, inspect one, graft it, remove it again."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def run_pack_demo(repo: Path, console) -> dict[str, Path]:
    from merge_cli.engine import default_max_memory
    from merge_cli.io.refs import open_checkpoint
    from merge_cli.skillpack.extract import extract
    from merge_cli.skillpack.graft import apply, remove
    from merge_cli.skillpack.inspect import print_summary, summarize
    from merge_cli.skillpack.settings import DEFAULTS

    t0 = time.perf_counter()
    models, packs_dir, out = (
        repo / "examples" / "models",
        repo / "examples" / "packs",
        repo / "examples" / "out",
    )
    packs_dir.mkdir(parents=True, exist_ok=True)
    budget = default_max_memory()
    packs = {}
    base = open_checkpoint(str(models / "base"))
    try:
        for skill in ("math", "code"):
            ft = open_checkpoint(str(models / skill))
            try:
                packs[skill] = Path(
                    extract(base, ft, packs_dir / f"{skill}.skillpack", DEFAULTS, max_memory=budget)["path"]
                )
            finally:
                ft.close()
    finally:
        base.close()
    print_summary(summarize(packs["math"]), console)
    graft = apply(
        str(models / "base"), [packs["math"]], out / "graft-math", overwrite=True, max_memory=budget
    )
    back = remove(graft, packs["math"], out / "graft-removed", overwrite=True, max_memory=budget)
    b, g, r, ft = (open_checkpoint(str(p)) for p in (models / "base", graft, back, models / "math"))
    try:
        err_sq = norm_sq = 0.0
        for n in b.tensors:
            d = ft.read(n).double() - b.read(n).double()
            err_sq += float((g.read(n).double() - ft.read(n).double()).pow(2).sum())
            norm_sq += float(d.pow(2).sum())
        same = all(torch.equal(r.read(n), b.read(n)) for n in b.tensors)
    finally:
        for c in (b, g, r, ft):
            c.close()
    console.print(f"grafted math.skillpack onto base -> {graft.relative_to(repo)}: distance to the math model "
                  f"{(err_sq / norm_sq) ** 0.5:.3f} of its delta; removed again -> base bitwise: {same} "
                  f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return packs
