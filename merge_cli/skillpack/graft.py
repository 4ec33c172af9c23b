"""Grafting packs onto a base, and removing them again (METHODS.md §13 (c)).

`sum` (the default, GraftLLM's apply): theta = base + sum_i w_i * delta_i, each tensor computed in float32
from the base and the decompressed deltas and rounded once to the base's dtype; the output mirrors the
base's shard layout. Any registered merge method (`--method ties`, ...) instead merges the virtual models
BASE+pack_i through the merge engine (their tensors are the base's dtype, as real fine-tunes would be).

Forget-free: the base and the packs are never modified. The output records what it was built from
(skillpack_graft.json: the base's weight-file sha256, each pack's sha256, method, weights); `remove`
rebuilds from the same base and the remaining packs, so removing every pack gives the base's tensors
bitwise, and removing one of several gives bitwise what applying the others alone gives.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from merge_cli.dtypes import ST_TO_TORCH
from merge_cli.io.refs import open_checkpoint
from merge_cli.io.writer import ShardedWriter, check_output, file_digest
from merge_cli.skillpack.format import Pack, PackError, weight_files

GRAFT_RECORD = "skillpack_graft.json"


def pack_name(path: Path) -> str:
    name = Path(path).name
    return name[: -len(".skillpack")] if name.endswith(".skillpack") else Path(path).stem


def parse_weights(text: str | None, names: list[str]) -> list[float]:
    """'math=1,code=0.5' (by pack name) or '1,0.5' (in order) -> one weight per pack (default 1)."""
    out = [1.0] * len(names)
    if not text:
        return out
    parts = [p.strip() for p in text.split(",") if p.strip()]
    for i, part in enumerate(parts):
        key, eq, value = part.rpartition("=")
        try:
            w = float(value)
        except ValueError:
            raise PackError(f"--weights '{part}': {value!r} is not a number") from None
        if not eq:
            if i >= len(out):
                raise PackError(f"--weights gives {len(parts)} weights for {len(names)} pack(s)")
            out[i] = w
        elif key in names:
            out[names.index(key)] = w
        else:
            raise PackError(f"--weights '{part}': no pack named '{key}' (packs: {', '.join(names)})")
    return out


def _layout(base) -> list[tuple[str, list[tuple[str, str, tuple[int, ...], int]]]]:
    """The base's shards (file names and tensor order), as the writer plans them."""
    shards = []
    for path, st in base.files.items():
        names = [n for n, i in sorted(st.tensors.items(), key=lambda kv: kv[1].start) if n in base.tensors]
        entries = [
            (n, base.tensors[n].dtype, tuple(base.tensors[n].shape), base.tensors[n].nbytes) for n in names
        ]
        shards.append((Path(path).name, entries))
    return shards


def _side_files(base, writer: ShardedWriter) -> None:
    from merge_cli.output.sidefiles import SIDE_FILES

    if base.folder is None:
        return
    for name in ("config.json", *SIDE_FILES):
        if (base.folder / name).is_file():
            writer.copy_file(base.folder / name, name)


def _record(base, packs: list[Pack], weights, method: str, params: dict) -> dict:
    return {
        "base": {"ref": str(Path(base.path).resolve()), "files": weight_files(base)},
        "packs": [
            {
                "name": pack_name(p.path),
                "path": str(p.path.resolve()),
                "sha256": file_digest(p.path)[0],
                "weight": w,
            }
            for p, w in zip(packs, weights, strict=True)
        ],
        "method": method,
        "parameters": params,
    }


def graft_sum(base, packs: list[Pack], weights: list[float], out: Path, record: dict, *,
              overwrite: bool, max_memory: int, progress: Callable[[int], None] | None = None) -> Path:  # fmt: skip
    """base + sum_i w_i delta_i, tensor by tensor in row blocks, written in the base's shard layout."""
    check_output(out, [Path(base.path)], overwrite)
    writer = ShardedWriter(out, _layout(base))
    try:
        for _fname, entries in writer.shards:
            for name, dtype, shape, nbytes in entries:
                active = [(p, w) for p, w in zip(packs, weights, strict=True)
                          if name in p.tensors and p.tensors[name]["scheme"] not in ("zero", "skip") and w != 0]  # fmt: skip
                rows = shape[0] if shape else 1
                if not active or not shape:
                    t = base.read(name)
                    if active:
                        acc = t.float() + sum(w * p.delta(name) for p, w in active)
                        t = acc.to(ST_TO_TORCH[dtype])
                    writer.write(name, t.reshape(shape))
                else:
                    step = max(1, max_memory // max(1, 12 * nbytes // rows))
                    for s in range(0, rows, step):
                        e = min(rows, s + step)
                        acc = base.read_rows(name, s, e).float()
                        for p, w in active:
                            acc += w * p.delta_rows(name, s, e).reshape(acc.shape)
                        writer.write(name, acc.to(ST_TO_TORCH[dtype]))
                if progress is not None:
                    progress(nbytes)
        writer.write_index({"merged_by": "merge-cli pack apply"})
        _side_files(base, writer)
        writer.write_json(GRAFT_RECORD, record)
        return writer.finish(overwrite)
    except BaseException:
        writer.abort()
        raise


def run_recipe(recipe: dict, out: Path, *, overwrite: bool, max_memory: int) -> Path:
    """Run a native-format recipe (a dict) through the merge engine into `out`."""
    import yaml

    from merge_cli.engine import EngineOptions
    from merge_cli.merge import execute
    from merge_cli.plan import build_plan
    from merge_cli.recipe import load_recipe

    with tempfile.TemporaryDirectory(prefix="merge-cli-graft-") as tmp:
        path = Path(tmp) / "graft.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        plan = build_plan(load_recipe(path))
        try:
            outcome = execute(plan, out, overwrite=overwrite, options=EngineOptions(max_memory=max_memory))
        finally:
            plan.close()
    return outcome.out_dir


def graft_method(base_ref: str, packs: list[Pack], weights, out: Path, record: dict, *, method: str,
                 params: dict, overwrite: bool, max_memory: int) -> Path:  # fmt: skip
    """Merge BASE+pack_i with a registered method through the engine (a generated recipe)."""
    from merge_cli.methods import get_method

    get_method(method, "--method")
    base_abs = str(Path(base_ref).resolve()) if Path(base_ref).exists() else base_ref  # a hub id stays one
    recipe = {
        "method": method,
        "base_model": base_abs,
        "models": [
            {"model": f"{base_abs}+{p.path.resolve()}", "parameters": {"weight": w}}
            for p, w in zip(packs, weights, strict=True)
        ],  # fmt: skip
    }
    if params:
        recipe["parameters"] = params
    final = run_recipe(recipe, out, overwrite=overwrite, max_memory=max_memory)
    (final / GRAFT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    manifest = final / "manifest.json"
    if manifest.is_file():  # keep the manifest complete: it lists every file of the folder
        m = json.loads(manifest.read_text())
        sha, size = file_digest(final / GRAFT_RECORD)
        m.setdefault("files", {})[GRAFT_RECORD] = {"sha256": sha, "size": size}
        manifest.write_text(json.dumps(m, indent=2, ensure_ascii=False) + "\n")
    return final


@contextlib.contextmanager
def _no_bar(total: int):
    yield None


def apply(base_ref: str, pack_paths: list[Path], out: Path, *, method: str = "sum", weights: str | None = None,
          params: dict | None = None, overwrite: bool = False, verify_base: bool = True, max_memory: int,
          bar: Callable | None = None) -> Path:  # fmt: skip
    """Graft; `bar(total_bytes)` is a context manager yielding progress(nbytes), entered once the inputs check out."""
    base = open_checkpoint(base_ref)
    packs: list[Pack] = []
    try:
        for p in pack_paths:
            packs.append(Pack(Path(p)))
            packs[-1].check_base(base, verify_sha=verify_base)
            packs[-1].check_values()
        names = [pack_name(p.path) for p in packs]
        w = parse_weights(weights, names)
        record = _record(base, packs, w, method, params or {})
        if method == "sum" or not packs:
            if params:
                raise PackError("--param is for --method; the default sum takes only --weights")
            check_output(out, [Path(base.path)], overwrite)
            with (bar or _no_bar)(base.total_bytes) as progress:
                return graft_sum(base, packs, w, out, record, overwrite=overwrite, max_memory=max_memory,
                                 progress=progress)  # fmt: skip
        base.close()
        return graft_method(base_ref, packs, w, out, record, method=method, params=params or {},
                            overwrite=overwrite, max_memory=max_memory)  # fmt: skip
    finally:
        base.close()
        for p in packs:
            p.close()


def read_record(grafted: Path) -> dict:
    path = Path(grafted) / GRAFT_RECORD
    try:
        rec = json.loads(path.read_text())
        assert isinstance(rec, dict) and isinstance(rec["packs"], list) and isinstance(rec["base"], dict)
    except (OSError, ValueError, KeyError, AssertionError, RecursionError):
        raise PackError(
            f"{grafted}: no readable {GRAFT_RECORD}; was it made by `merge-cli pack apply`?"
        ) from None
    return rec


def remove(grafted: Path, pack_path: Path, out: Path, *, base_ref: str | None = None, **kw) -> Path:
    """Rebuild `grafted` without `pack_path` from the recorded base and the remaining packs."""
    rec = read_record(grafted)
    sha = file_digest(Path(pack_path))[0] if Path(pack_path).is_file() else None
    if sha is None:
        raise PackError(f"pack {pack_path}: no such file")
    hits = [i for i, p in enumerate(rec["packs"]) if p.get("sha256") == sha]
    if not hits:
        listed = ", ".join(p.get("name", "?") for p in rec["packs"]) or "none"
        raise PackError(f"pack {pack_path} is not grafted into {grafted} (its packs: {listed})")
    keep = [p for i, p in enumerate(rec["packs"]) if i != hits[0]]
    for p in keep:
        if not Path(p["path"]).is_file() or file_digest(Path(p["path"]))[0] != p["sha256"]:
            raise PackError(
                f"pack {p['path']} grafted into {grafted} is missing or changed; restore it first"
            )
    base_ref = base_ref or rec["base"].get("ref")
    base = open_checkpoint(base_ref)
    try:
        if weight_files(base) != rec["base"].get("files"):
            raise PackError(
                f"base '{base_ref}' is not the base {grafted} was grafted onto; pass the right --base"
            )
    finally:
        base.close()
    weights = ",".join(str(p["weight"]) for p in keep)
    return apply(base_ref, [Path(p["path"]) for p in keep], out, method=rec.get("method", "sum"),
                 weights=weights or None, params=rec.get("parameters") or None, **kw)  # fmt: skip
