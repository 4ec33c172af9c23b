"""One tensor's delta -> pack tensors and a metadata entry, and back (METHODS.md §13 (b)-(d)).

Pack tensor keys for a model tensor N (all row-major):
  dense   N::delta                 float32, N's shape
  prune   N::idx, N::val           [rows, kept] column indices (int16, or int32 past 32767 columns) and values
                                   (bfloat16 or float32) of each row's largest |delta|; rows = shape[0]
  svd     N::S                     float32 [k] singular values, largest first
          N::U.j / N::V.j          band j as a float factor (bits 16: bfloat16, 32: float32), or
          N::U.j.q, .scale, .zero  band j quantized: packed b-bit codes, float32 scale and uint8 zero per row
                                   (quant.py); U.j holds U[:, a:b]^T [b-a, m], V.j holds V^T[a:b] [b-a, n]
  zero / skip                      nothing (the delta is exactly zero / was dropped on purpose)
delta = sum_j dequant(U.j)^T * S[a:b] @ dequant(V.j); a pruned delta is zero except at the kept entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from merge_cli.skillpack.quant import FLOAT_BITS, dequantize_rows, pack_bits, quantize_rows, unpack_bits
from merge_cli.skillpack.settings import GroupSettings

Getter = Callable[[str], torch.Tensor]


def effective_scheme(shape: tuple[int, ...], s: GroupSettings) -> str:
    if s.scheme == "skip":
        return "skip"
    if s.scheme == "svd" and len(shape) != 2:
        return "dense"
    if s.scheme == "prune" and (len(shape) < 2 or s.keep >= 1.0):
        return "dense"
    return s.scheme


def kept_per_row(cols: int, keep: float) -> int:
    return max(1, min(cols, math.ceil(keep * cols - 1e-9)))


def idx_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 32767 else torch.int32


# -- prune ------------------------------------------------------------------------------------------
def prune_rows(d: torch.Tensor, keep: float, value_bits: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(idx, val, squared error) for a float32 block of rows [r, c]: each row keeps its largest |delta|."""
    kr = kept_per_row(d.shape[1], keep)
    idx = torch.topk(d.abs(), kr, dim=1, sorted=False).indices.sort(dim=1).values
    val = d.gather(1, idx).to(FLOAT_BITS[value_bits])
    rec = torch.zeros_like(d).scatter_(1, idx, val.float())
    err = float((d - rec).double().pow(2).sum())
    return idx.to(idx_dtype(d.shape[1])), val, err


def prune_decode(idx: torch.Tensor, val: torch.Tensor, cols: int) -> torch.Tensor:
    out = torch.zeros(idx.shape[0], cols, dtype=torch.float32)
    return out.scatter_(1, idx.long(), val.float())


# -- svd --------------------------------------------------------------------------------------------
def choose_rank(s: torch.Tensor, g: GroupSettings) -> tuple[int, float]:
    """(k, energy kept) for singular values s (largest first): a fixed rank, else the smallest k reaching beta."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 0, 1.0
    cum = torch.cumsum(e, 0)
    if g.rank is not None:
        k = min(g.rank, s.numel())
    elif g.rank_fraction is not None:
        k = int(g.rank_fraction * s.numel())
        if k == 0:
            return 0, 0.0
    else:
        k = min(int((cum < g.beta * total).sum()) + 1, s.numel())
    return k, float(cum[k - 1]) / total


def split_bands(k: int, bands) -> list[tuple[int, int, int]]:
    """[(start, stop, bits)] partitioning [0, k), highest precision first; empty bands dropped."""
    out, start = [], 0
    for count, bits in bands:
        stop = k if count is None else min(k, start + count)
        if stop > start:
            out.append((start, stop, bits))
        start = stop
    return out


def _store_factor(key: str, rows: torch.Tensor, bits: int, out: dict[str, torch.Tensor]) -> None:
    if bits in FLOAT_BITS:
        out[key] = rows.to(FLOAT_BITS[bits]).contiguous()
        return
    q, scale, zero = quantize_rows(rows, bits)
    out[key + ".q"] = pack_bits(q, bits)
    out[key + ".scale"] = scale.contiguous()
    out[key + ".zero"] = zero.contiguous()


def load_factor(get: Getter, key: str, bits: int, rows: int, cols: int) -> torch.Tensor:
    """Band factor [rows, cols] in float32."""
    if bits in FLOAT_BITS:
        return get(key).float().reshape(rows, cols)
    q = unpack_bits(get(key + ".q"), bits, rows * cols).reshape(rows, cols)
    return dequantize_rows(q, get(key + ".scale"), get(key + ".zero"))


def thin_svd(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of a float32 matrix; a tall (or wide) one is first reduced by QR, D = QR, svd(R) (the same
    factorisation, about 2x faster here than LAPACK's direct SVD on MLP-shaped matrices)."""
    m, n = d.shape
    if m >= 2 * n:
        q, r = torch.linalg.qr(d)
        ur, s, vh = torch.linalg.svd(r)
        return q @ ur, s, vh
    if n >= 2 * m:
        u, s, vh = thin_svd(d.T)
        return vh.T, s, u.T
    return torch.linalg.svd(d, full_matrices=False)


def _store_compensated(name, d, u, s, vh, bands, h, damp, out) -> None:
    """Bands quantized with GPTQ-style compensation on the input Hessian h (gptq.py)."""
    from merge_cli.skillpack.gptq import compensated_band
    from merge_cli.skillpack.quant import pack_bits

    resid = d.clone()
    for j, (a, b, bits) in enumerate(bands):
        if bits in FLOAT_BITS:
            _store_factor(f"{name}::U.{j}", u[:, a:b].T, bits, out)
            _store_factor(f"{name}::V.{j}", vh[a:b], bits, out)
            ut = out[f"{name}::U.{j}"].float()
            resid -= (ut.T * s[a:b]) @ out[f"{name}::V.{j}"].float()
            continue
        (qv, sv, zv), (qu, su, zu), contrib = compensated_band(resid, s[a:b], vh[a:b], h, bits, damp)
        for side, (q, sc, z) in (("U", (qu, su, zu)), ("V", (qv, sv, zv))):
            out[f"{name}::{side}.{j}.q"] = pack_bits(q, bits)
            out[f"{name}::{side}.{j}.scale"] = sc.float().contiguous()
            out[f"{name}::{side}.{j}.zero"] = z.contiguous()
        resid -= contrib


def svd_compress(name: str, d: torch.Tensor, g: GroupSettings, h: torch.Tensor | None = None,
                 damp: float = 0.01) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    u, s, vh = thin_svd(d)
    k, energy = choose_rank(s, g)
    out: dict[str, torch.Tensor] = {f"{name}::S": s[:k].contiguous()}
    bands = split_bands(k, g.bands)
    if h is not None:
        _store_compensated(name, d, u, s, vh, bands, h, damp, out)
    else:
        for j, (a, b, bits) in enumerate(bands):
            _store_factor(f"{name}::U.{j}", u[:, a:b].T, bits, out)
            _store_factor(f"{name}::V.{j}", vh[a:b], bits, out)
    entry = {
        "scheme": "svd",
        "rank": k,
        "max_rank": min(d.shape),
        "energy": energy,
        "bands": [{"start": a, "stop": b, "bits": bits} for a, b, bits in bands],
    }
    return entry, out


def svd_decode(get: Getter, name: str, entry: dict, start: int, stop: int) -> torch.Tensor:
    m, n = entry["shape"]
    out = torch.zeros(stop - start, n, dtype=torch.float32)
    if not entry["bands"]:
        return out
    s = get(f"{name}::S").float()
    for j, band in enumerate(entry["bands"]):
        a, b, bits = band["start"], band["stop"], band["bits"]
        ut = load_factor(get, f"{name}::U.{j}", bits, b - a, m)
        v = load_factor(get, f"{name}::V.{j}", bits, b - a, n)
        out.addmm_(ut[:, start:stop].T * s[a:b], v)
    return out


# -- any scheme -------------------------------------------------------------------------------------
def decode_rows(get: Getter, name: str, entry: dict, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the decompressed delta in float32, shaped [stop - start, *shape[1:]]."""
    shape = tuple(entry["shape"])
    rest = shape[1:]
    scheme = entry["scheme"]
    if scheme == "dense":
        full = get(f"{name}::delta").float()
        return full.reshape(shape)[start:stop] if shape else full.reshape(shape)
    if scheme in ("zero", "skip"):
        return torch.zeros((stop - start, *rest) if shape else (), dtype=torch.float32)
    if scheme == "prune":
        cols = math.prod(rest)
        idx, val = get(f"{name}::idx")[start:stop], get(f"{name}::val")[start:stop]
        return prune_decode(idx, val, cols).reshape(stop - start, *rest)
    return svd_decode(get, name, entry, start, stop)


def rel_error(err_sq: float, norm_sq: float) -> float:
    return math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0


def compress_tensor(name: str, delta: torch.Tensor, g: GroupSettings, h: torch.Tensor | None = None,
                    damp: float = 0.01) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """A whole float32 delta -> (metadata entry, pack tensors), with the relative Frobenius error measured
    by decoding the stored tensors (what apply will add)."""
    shape = tuple(delta.shape)
    norm_sq = float(delta.double().pow(2).sum())
    scheme = effective_scheme(shape, g)
    if scheme != "skip" and norm_sq == 0.0:
        scheme = "zero"
    tensors: dict[str, torch.Tensor] = {}
    if scheme == "svd":
        entry, tensors = svd_compress(name, delta, g, h, damp)
    elif scheme == "prune":
        d2 = delta.reshape(shape[0], -1)
        idx, val, _ = prune_rows(d2, g.keep, g.value_bits)
        entry = {"scheme": "prune", "keep": g.keep, "kept_per_row": idx.shape[1]}
        tensors = {f"{name}::idx": idx, f"{name}::val": val}
    elif scheme == "dense":
        entry, tensors = {"scheme": "dense"}, {f"{name}::delta": delta.contiguous()}
    else:
        entry = {"scheme": scheme}
    entry["shape"] = list(shape)
    rows = shape[0] if shape else 1
    rec = decode_rows(tensors.__getitem__, name, entry, 0, rows).reshape(shape)
    err_sq = float((delta - rec).double().pow(2).sum())
    entry.update(delta_norm=math.sqrt(norm_sq), rel_error=rel_error(err_sq, norm_sq))
    if h is not None and scheme == "svd":
        from merge_cli.skillpack.calibrate import calib_rel_error

        entry.update(calibrated=True, calib_rel_error=calib_rel_error(delta - rec, delta, h))
    return entry, tensors
