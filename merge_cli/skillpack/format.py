"""The SkillPack file: one safetensors file, readable with plain `safetensors` + `json`.

The safetensors header's `__metadata__` holds two strings: "format" = "merge-cli-skillpack" and
"skillpack" = a JSON document (version 1):

  {"format": "merge-cli-skillpack", "version": 1, "created_by": "merge-cli 0.x",
   "base":   {"ref": ..., "files": {weight file name: sha256}, "architectures": [...]},
   "source": {"ref": ..., "files": {...}},              the fine-tune the delta came from
   "settings": {group: knobs},                           settings.py
   "tensors": {N: {"scheme": "svd"|"prune"|"dense"|"zero"|"skip", "shape": [...], "dtype": "BF16",
                   "group": ..., "layer": ..., "delta_norm": ||delta||_F, "rel_error": ||delta - stored||_F /
                   ||delta||_F, scheme fields: rank, max_rank, energy, bands [{start, stop, bits}] (svd),
                   keep, kept_per_row (prune)}},
   "totals": {"delta_bytes": bytes of the full delta in the base's dtypes, "tensors": count}}

The tensors are named N::delta, N::idx, ... as compress.py documents. Version 1 readers refuse other
versions, unknown schemes, and tensors whose dtype or shape disagrees with the metadata.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from merge_cli.dtypes import ITEMSIZE, TORCH_TO_ST
from merge_cli.errors import CheckpointError
from merge_cli.io.safetensors_file import SafetensorsFile
from merge_cli.io.writer import file_digest, shard_header
from merge_cli.skillpack.compress import decode_rows, idx_dtype, prune_decode
from merge_cli.skillpack.quant import FLOAT_BITS, QUANT_BITS, packed_size

FORMAT = "merge-cli-skillpack"
VERSION = 1
SCHEMES = ("svd", "prune", "dense", "zero", "skip")


class PackError(CheckpointError):
    """A SkillPack is malformed, of an unknown version, or does not fit the base it is applied to."""


class PackWriter:
    """Tensors appended to a body file as they come; finish() writes header + body to OUT via a temp name."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.body_path = self.out.parent / f".{self.out.name}.body.partial"
        self.entries: list[tuple[str, str, tuple[int, ...], int]] = []
        self.names: set[str] = set()
        self.body = open(self.body_path, "wb")  # noqa: SIM115

    def add(self, key: str, t: torch.Tensor) -> None:
        if key in self.names:
            raise RuntimeError(f"pack tensor {key} written twice")
        t = t.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        self.body.write(raw)
        self.entries.append((key, TORCH_TO_ST[t.dtype], tuple(t.shape), t.numel() * t.element_size()))
        self.names.add(key)

    def begin(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Start a tensor written in row blocks (write_rows), closed by end() or dropped by cancel()."""
        self._open = (key, dtype, tuple(shape), self.body.tell())

    def write_rows(self, t: torch.Tensor) -> None:
        self.body.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def end(self) -> None:
        key, dtype, shape, start = self._open
        nbytes = self.body.tell() - start
        expect = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes != expect:
            raise RuntimeError(f"pack tensor {key}: {nbytes} bytes written, {expect} planned")
        self.entries.append((key, TORCH_TO_ST[dtype], shape, nbytes))
        self.names.add(key)

    def cancel(self) -> None:
        self.body.truncate(self._open[3])
        self.body.seek(self._open[3])

    def finish(self, meta: dict) -> Path:
        self.body.close()
        header = shard_header(self.entries, {"format": FORMAT, "skillpack": json.dumps(meta, sort_keys=True)})
        tmp = self.out.parent / f".{self.out.name}.partial"
        with open(tmp, "wb") as f, open(self.body_path, "rb") as body:
            f.write(header)
            shutil.copyfileobj(body, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)
        self.body_path.unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        self.body.close()
        self.body_path.unlink(missing_ok=True)
        (self.out.parent / f".{self.out.name}.partial").unlink(missing_ok=True)


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: one hash per file per process


def _digest(p: Path) -> str:
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(p)[0]
    return _DIGESTS[key]


def weight_files(ck) -> dict[str, str]:
    """{weight file name: sha256} of a checkpoint's tensor files (the base's identity)."""
    out = {}
    for p in sorted(ck.files, key=str):
        p = Path(p)
        rel = p.relative_to(ck.folder).as_posix() if ck.folder and p.is_relative_to(ck.folder) else p.name
        out[rel] = _digest(p)
    return out


def _expect(meta_name: str, pack: Pack, key: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
    info = pack.st.tensors.get(key)
    if info is None:
        raise pack.fail(
            f"tensor '{meta_name}' needs '{key}', which the file does not hold (truncated or edited?)"
        )
    if info.dtype not in dtypes or tuple(info.shape) != tuple(shape):
        raise pack.fail(
            f"'{key}' is {info.dtype}{list(info.shape)} but the metadata says {'/'.join(dtypes)}{list(shape)}"
        )


def _band_keys(pack: Pack, name: str, side: str, j: int, bits: int, rows: int, cols: int) -> list[str]:
    key = f"{name}::{side}.{j}"
    if bits in FLOAT_BITS:
        _expect(name, pack, key, (TORCH_TO_ST[FLOAT_BITS[bits]],), (rows, cols))
        return [key]
    _expect(name, pack, key + ".q", ("U8",), (packed_size(rows * cols, bits),))
    _expect(name, pack, key + ".scale", ("F32",), (rows,))
    _expect(name, pack, key + ".zero", ("U8",), (rows,))
    return [key + ".q", key + ".scale", key + ".zero"]


class Pack:
    """A validated SkillPack: metadata plus lazy reads of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PackError(f"pack {self.path}: no such file")
        self.st = SafetensorsFile(self.path)
        try:
            self.meta = self._read_meta()
            self.tensors: dict[str, dict] = self.meta["tensors"]
            self._validate()
        except BaseException:
            self.st.close()
            raise

    def fail(self, what: str) -> PackError:
        return PackError(f"pack {self.path}: {what}")

    def _read_meta(self) -> dict:
        md = self.st.metadata or {}
        if md.get("format") != FORMAT or "skillpack" not in md:
            raise self.fail(
                "not a SkillPack (no 'skillpack' metadata); make one with `merge-cli pack extract`"
            )
        try:
            meta = json.loads(md["skillpack"])
        except (ValueError, RecursionError) as e:
            raise self.fail(f"unreadable SkillPack metadata ({str(e)[:80]})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
            raise self.fail("SkillPack metadata is not an object with a 'tensors' map")
        v = meta.get("version")
        if v != VERSION:
            raise self.fail(f"format version {v!r} is not supported (this merge-cli reads version {VERSION})")
        return meta

    def _validate(self) -> None:
        used: set[str] = set()
        for name, e in self.tensors.items():
            if not isinstance(e, dict) or e.get("scheme") not in SCHEMES:
                scheme = e.get("scheme") if isinstance(e, dict) else e
                raise self.fail(f"tensor '{name}' has unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")
            shape = e.get("shape")
            if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
                raise self.fail(f"tensor '{name}' has no valid shape")
            for key in ("delta_norm", "rel_error", "keep", "energy"):
                v = e.get(key, 0.0)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise self.fail(f"tensor '{name}': '{key}' is {v!r}, not a non-negative number")
            if not isinstance(e.get("group", "other"), str) or not isinstance(e.get("dtype", "F32"), str):
                raise self.fail(f"tensor '{name}': 'group' and 'dtype' must be strings")
            used.update(self._validate_entry(name, e, tuple(shape)))
        extra = sorted(set(self.st.tensors) - used)
        if extra:
            raise self.fail(f"tensor '{extra[0]}' is not described by the metadata")

    def _validate_entry(self, name: str, e: dict, shape: tuple[int, ...]) -> list[str]:
        scheme = e["scheme"]
        if scheme == "dense":
            _expect(name, self, f"{name}::delta", ("F32",), shape)
            return [f"{name}::delta"]
        if scheme == "prune":
            kr = e.get("kept_per_row")
            cols = 1
            for x in shape[1:]:
                cols *= x
            if len(shape) < 2 or not isinstance(kr, int) or not 1 <= kr <= cols:
                raise self.fail(f"tensor '{name}': kept_per_row {kr!r} does not fit shape {list(shape)}")
            _expect(name, self, f"{name}::idx", (TORCH_TO_ST[idx_dtype(cols)],), (shape[0], kr))
            _expect(name, self, f"{name}::val", ("BF16", "F32"), (shape[0], kr))
            return [f"{name}::idx", f"{name}::val"]
        if scheme == "svd":
            return self._validate_svd(name, e, shape)
        return []

    def _validate_svd(self, name: str, e: dict, shape: tuple[int, ...]) -> list[str]:
        k, bands = e.get("rank"), e.get("bands")
        if (
            len(shape) != 2
            or not isinstance(k, int)
            or not 0 <= k <= min(shape)
            or not isinstance(bands, list)
        ):
            raise self.fail(f"tensor '{name}': rank {k!r} does not fit shape {list(shape)}")
        keys, start = [f"{name}::S"], 0
        _expect(name, self, keys[0], ("F32",), (k,))
        for j, b in enumerate(bands):
            ok = isinstance(b, dict) and b.get("start") == start and isinstance(b.get("stop"), int)
            if not ok or not start < b["stop"] <= k or b.get("bits") not in (*QUANT_BITS, *FLOAT_BITS):
                raise self.fail(
                    f"tensor '{name}': band {j} ({b!r}) does not partition [0, {k}) with 2..8/16/32 bits"
                )
            nb = b["stop"] - start
            keys += _band_keys(self, name, "U", j, b["bits"], nb, shape[0])
            keys += _band_keys(self, name, "V", j, b["bits"], nb, shape[1])
            start = b["stop"]
        if start != k:
            raise self.fail(f"tensor '{name}': its bands cover [0, {start}) but the rank is {k}")
        return keys

    # -- reads --------------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        return self.st.read(key)

    def delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self.tensors[name]
        if e["scheme"] == "prune":  # only these rows' entries are read
            idx, val = (
                self.st.read_rows(self.st.tensors[f"{name}::{k}"], start, stop) for k in ("idx", "val")
            )
            cols = math.prod(e["shape"][1:])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cols):
                raise self.fail(f"tensor '{name}': a pruned entry's column index is outside [0, {cols})")
            out = prune_decode(idx, val, cols).reshape(stop - start, *e["shape"][1:])
        else:
            out = decode_rows(self.get, name, e, start, stop)
        if out.numel() and not torch.isfinite(out).all():
            raise self.fail(f"tensor '{name}' decodes to NaN or Inf values; the pack is corrupt")
        return out

    def delta(self, name: str) -> torch.Tensor:
        shape = self.tensors[name]["shape"]
        return self.delta_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def check_values(self) -> None:
        """Read every stored tensor once: floats finite, pruned column indices in range (a pack is small)."""
        for name, e in self.tensors.items():
            for key in (k for k in self.st.tensors if k.startswith(name + "::")):
                t = self.get(key)
                if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
                    raise self.fail(f"'{key}' holds NaN or Inf values; the pack is corrupt")
                if key.endswith("::idx") and t.numel():
                    cols = math.prod(e["shape"][1:])
                    if int(t.min()) < 0 or int(t.max()) >= cols:
                        raise self.fail(
                            f"tensor '{name}': a pruned entry's column index is outside [0, {cols})"
                        )

    def check_base(self, ck, verify_sha: bool = True) -> None:
        """Refuse a base that lacks a packed tensor, has another shape for it, or other weight files."""
        for name, e in self.tensors.items():
            info = ck.tensors.get(name)
            if info is None:
                raise self.fail(
                    f"tensor '{name}' is not in base '{ck.ref}'; is it the base the pack was made from?"
                )
            if list(info.shape) != list(e["shape"]):
                raise self.fail(
                    f"tensor '{name}' is {e['shape']} in the pack but {list(info.shape)} in base '{ck.ref}'"
                )
        if not verify_sha:
            return
        want = (self.meta.get("base") or {}).get("files") or {}
        got = weight_files(ck)
        if want != got:
            diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got.get(k))
            raise self.fail(
                f"was extracted from another base (weight file '{diff[0]}' differs from base '{ck.ref}'); "
                "use the base it names or pass --skip-base-check"
            )

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self.st.close()


def full_delta_bytes(tensors: dict[str, dict]) -> int:
    n = 0
    for e in tensors.values():
        count = 1
        for x in e["shape"]:
            count *= x
        n += count * ITEMSIZE.get(e.get("dtype", "F32"), 4)
    return n
