"""Streamed extraction: base + fine-tune -> a SkillPack file, one tensor at a time.

SVD-compressed tensors are read whole (the SVD needs the matrix); everything else (pruned embeddings and
lm_head, dense norms) is read in row blocks sized from the memory budget, so peak memory is about a
block of two inputs plus the largest SVD matrix's workspace, whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from merge_cli import __version__
from merge_cli.dtypes import ITEMSIZE, is_float
from merge_cli.modules import classify
from merge_cli.skillpack.compress import (
    compress_tensor,
    effective_scheme,
    prune_rows,
    rel_error,
)
from merge_cli.skillpack.format import FORMAT, VERSION, PackError, PackWriter, weight_files
from merge_cli.skillpack.settings import GroupSettings

SVD_COPIES = 6  # float32 copies of an m x n matrix alive during its SVD (inputs, delta, U, V^T, workspace)


def _identity(ck) -> dict:
    cfg = ck.config or {}
    return {"ref": ck.ref, "files": weight_files(ck), "architectures": cfg.get("architectures")}


def check_pair(base, ft) -> list[str]:
    """The tensor names to pack, in the base's order; refuse fine-tunes of another shape or naming."""
    extra = sorted(set(ft.tensors) - set(base.tensors))
    if extra:
        raise PackError(f"fine-tune '{ft.ref}' has tensor '{extra[0]}' that base '{base.ref}' lacks; "
                        "a pack stores deltas of the base's tensors only")  # fmt: skip
    names = list(base.tensors)
    for n in names:
        if n not in ft.tensors:
            raise PackError(f"fine-tune '{ft.ref}' lacks tensor '{n}' of base '{base.ref}'")
        if tuple(ft.tensors[n].shape) != tuple(base.tensors[n].shape):
            raise PackError(
                f"tensor '{n}' is {list(ft.tensors[n].shape)} in '{ft.ref}' but {list(base.tensors[n].shape)} "
                f"in base '{base.ref}'; packs need the same shapes (resize the vocabulary first)"
            )
    return names


def _entry_extra(name: str, dtype: str) -> dict:
    info = classify(name)
    return {"dtype": dtype, "group": info.group, "layer": info.layer}


def compress_state_dict(base: dict, ft: dict, settings: dict[str, GroupSettings]):
    """In memory: ({name: entry}, {key: tensor}) for two state dicts (the reference for the streamed path)."""
    from merge_cli.dtypes import TORCH_TO_ST

    entries, tensors = {}, {}
    for name, b in base.items():
        g = settings[classify(name).group]
        entry, t = compress_tensor(name, ft[name].float() - b.float(), g)
        entry.update(_entry_extra(name, TORCH_TO_ST[b.dtype]))
        entries[name] = entry
        tensors.update(t)
    return entries, tensors


def _streamed(name, base, ft, g, w: PackWriter, budget: int) -> dict:
    """A pruned or dense tensor, row block by row block."""
    info = base.tensors[name]
    shape = tuple(info.shape)
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:]) if shape else 1
    scheme = effective_scheme(shape, g)
    step = max(1, budget // max(1, cols * 4 * 6))
    idx, val = [], []
    err = norm = 0.0
    if scheme == "dense":
        w.begin(f"{name}::delta", torch.float32, shape)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        if shape:
            d = ft.read_rows(name, s, e).float() - base.read_rows(name, s, e).float()
        else:
            d = ft.read(name).float() - base.read(name).float()
        norm += float(d.double().pow(2).sum())
        if scheme == "prune":
            i, v, es = prune_rows(d.reshape(e - s, cols), g.keep, g.value_bits)
            idx.append(i)
            val.append(v)
            err += es
        elif scheme == "dense":
            w.write_rows(d)
    if scheme == "dense" and norm == 0.0:
        w.cancel()
        scheme = "zero"
    elif scheme == "dense":
        w.end()
    if scheme == "prune" and norm == 0.0:
        scheme = "zero"
    entry: dict = {"scheme": scheme}
    if scheme == "prune":
        entry.update(keep=g.keep, kept_per_row=idx[0].shape[1])
        w.add(f"{name}::idx", torch.cat(idx))
        w.add(f"{name}::val", torch.cat(val))
    if scheme == "skip":
        err = norm
    entry.update(shape=list(shape), delta_norm=math.sqrt(norm), rel_error=rel_error(err, norm))
    return entry


def extract(
    base,
    ft,
    out: Path,
    settings: dict[str, GroupSettings],
    *,
    max_memory: int,
    progress: Callable[[int], None] | None = None,
    hessians: dict | None = None,
    damp: float = 0.01,
) -> dict:
    """Write the pack of ft - base to `out` (via a temp name); returns its metadata."""
    names = check_pair(base, ft)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "created_by": f"merge-cli {__version__}",
        "base": _identity(base),
        "source": _identity(ft),
        "settings": {grp: s.as_json() for grp, s in settings.items()},
    }
    if hessians is not None:
        meta["calibration"] = {"method": "gptq", "damp": damp, "modules": len(hessians)}
    entries: dict[str, dict] = {}
    w = PackWriter(out)
    try:
        for name in names:
            info = base.tensors[name]
            g = settings[classify(name).group]
            if not is_float(info.dtype) or not is_float(ft.tensors[name].dtype):
                if not torch.equal(base.read(name), ft.read(name)):
                    raise PackError(f"tensor '{name}' is {info.dtype} and differs between base and fine-tune; "
                                    "a pack carries float deltas only")  # fmt: skip
                entry = {"scheme": "zero", "shape": list(info.shape), "delta_norm": 0.0, "rel_error": 0.0}
            elif effective_scheme(tuple(info.shape), g) == "svd":
                need = SVD_COPIES * 4 * info.numel
                if need > max_memory:
                    raise PackError(
                        f"tensor '{name}' {list(info.shape)} needs about {need / 1e6:.1f} MB for its SVD, "
                        f"more than --max-memory {max_memory / 1e6:.1f} MB; raise it or set "
                        f"{classify(name).group}.scheme=prune"
                    )
                delta = ft.read(name).float() - base.read(name).float()
                h = (hessians or {}).get(name)
                entry, tensors = compress_tensor(name, delta, g, h, damp)
                del delta
                for key, t in tensors.items():
                    w.add(key, t)
            else:
                entry = _streamed(name, base, ft, g, w, max_memory)
            entry.update(_entry_extra(name, info.dtype))
            entries[name] = entry
            if progress is not None:
                progress(info.numel * ITEMSIZE.get(info.dtype, 4))
        meta["tensors"] = entries
        meta["totals"] = {"tensors": len(entries), "delta_bytes": sum(
            base.tensors[n].numel * ITEMSIZE.get(base.tensors[n].dtype, 4) for n in names)}  # fmt: skip
        return {**meta, "path": str(w.finish(meta))}
    except BaseException:
        w.abort()
        raise
