"""Round-to-nearest, per-row asymmetric integer quantization and dense bit packing.

A row x (one singular vector of a factor) with b bits (2..8) is stored as integers q in [0, 2^b - 1], a
float32 scale and an integer zero point:

    lo = min(min(x), 0), hi = max(max(x), 0)        (the range always holds 0, as GPTQ does)
    scale = (hi - lo) / (2^b - 1)                    (1 when the row is all zeros)
    zero = clamp(round(-lo / scale), 0, 2^b - 1)
    q = clamp(round(x / scale) + zero, 0, 2^b - 1)   (round half to even)
    x_hat = (q - zero) * scale

The q of a whole matrix are packed row-major into bytes, b bits each, least significant bit first
(numpy's packbits/unpackbits with bitorder="little"), so a b-bit matrix of n values takes ceil(n*b/8) bytes.
"""

from __future__ import annotations

import numpy as np
import torch

QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = {16: torch.bfloat16, 32: torch.float32}  # bits 16 and 32 store the factor as a float


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 [r, c], scale float32 [r], zero uint8 [r]) for a float32 matrix x [r, c]."""
    qmax = (1 << bits) - 1
    x = x.float()
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = (torch.round(x / scale[:, None]) + zero[:, None]).clamp(0, qmax)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero.float()[:, None]) * scale.float()[:, None]


def packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values < 2^bits (any shape, row-major) -> uint8 [ceil(n*bits/8)]."""
    flat = q.reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of pack_bits: uint8 [n]."""
    raw = packed.reshape(-1).numpy()
    if bits == 8:
        return torch.from_numpy(raw[:n].copy())
    planes = np.unpackbits(raw, bitorder="little")[: n * bits].reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return torch.from_numpy((planes.astype(np.uint16) @ weights).astype(np.uint8))
