"""GPTQ-style error compensation of the SVD factors on calibration activations (METHODS.md §13 (c)).

For a linear module with input x (calibration Hessian H = sum x x^T, n x n), band j over singular indices
[a, b) of delta = U S V^T is quantized in two GPTQ steps, highest-precision band first:

  1. V^T[a:b] (rows = singular vectors, columns = inputs) with H: column by column, each column rounded to
     the grid (one scale and zero per row, from the rows' range), the rounding error spread over the
     columns not yet quantized through the Cholesky factor of H^-1 (Frantar et al. 2023, GPTQ).
  2. U for A = S[a:b] V_hat^T[a:b]: the target is not U[:, a:b] but the least-squares fit of what is still
     missing, U* = R H A^T (A H A^T)^-1 with R = delta - the bands already stored (so V's rounding error and
     earlier bands' errors are folded in), quantized by GPTQ on H_A = A H A^T; a column's scale is taken
     when its turn comes (one scale per singular vector, as the format stores it).
The damping is `damp` x mean(diag(H)) (0.01 by default); inputs never seen (H_ii = 0) get H_ii = 1.
No act-order and no groups: one scale per stored row, the pack format's.
"""

from __future__ import annotations

import torch

from merge_cli.skillpack.quant import dequantize_rows


def _inv_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in float64."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    d = torch.diagonal(h)
    d += damp * float(d.mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


def _grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of x, as quant.quantize_rows computes them."""
    qmax = (1 << bits) - 1
    lo = x.amin(dim=1).clamp(max=0.0)
    hi = x.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale).clamp(0, qmax)


def gptq_rows_fixed(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float):
    """GPTQ of W [r, c] on input Hessian H [c, c], one scale per row of W: (q uint8, scale, zero uint8)."""
    qmax = (1 << bits) - 1
    w = w.double().clone()
    u = _inv_chol(h, damp)
    scale, zero = _grid(w.float(), bits)
    s, z = scale.double(), zero.double()
    q = torch.empty(w.shape, dtype=torch.uint8)
    for i in range(w.shape[1]):
        col = w[:, i]
        qi = (torch.round(col / s) + z).clamp(0, qmax)
        q[:, i] = qi.to(torch.uint8)
        err = (col - (qi - z) * s) / u[i, i]
        w[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    return q, scale, zero.to(torch.uint8)


def gptq_cols_dynamic(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float):
    """GPTQ of W [r, c] on H [c, c], one scale per column of W, taken when the column's turn comes.
    Returns the stored layout: (q uint8 [c, r], scale [c], zero uint8 [c]) for W^T's rows."""
    qmax = (1 << bits) - 1
    w = w.double().clone()
    u = _inv_chol(h, damp)
    qs, scales, zeros = [], [], []
    for i in range(w.shape[1]):
        col = w[:, i]
        scale, zero = _grid(col.float()[None, :], bits)
        s, z = scale.double(), zero.double()
        qi = (torch.round(col / s) + z).clamp(0, qmax)
        qs.append(qi.to(torch.uint8))
        scales.append(scale)
        zeros.append(zero.to(torch.uint8))
        err = (col - (qi - z) * s) / u[i, i]
        w[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    return torch.stack(qs), torch.cat(scales), torch.cat(zeros)


def compensated_band(resid: torch.Tensor, s_band: torch.Tensor, vt_band: torch.Tensor, h: torch.Tensor,
                     bits: int, damp: float):  # fmt: skip
    """One band, both steps. Returns ((qv, sv, zv), (qu, su, zu), contribution U_hat S V_hat^T in float32)."""
    hh = h.double()
    qv, sv, zv = gptq_rows_fixed(vt_band, hh, bits, damp)
    v_hat = dequantize_rows(qv, sv, zv).double()  # [nb, n]
    a = s_band.double()[:, None] * v_hat  # [nb, n]
    ha = a @ hh @ a.T
    ha_d = ha + damp * float(torch.diagonal(ha).mean().clamp(min=1e-30)) * torch.eye(
        ha.shape[0], dtype=ha.dtype
    )
    u_star = torch.linalg.solve(ha_d, (resid.double() @ hh @ a.T).T).T  # [m, nb]
    qu, su, zu = gptq_cols_dynamic(u_star, ha, bits, damp)
    u_hat = dequantize_rows(qu, su, zu).double().T  # [m, nb]
    return (qv, sv, zv), (qu, su, zu), (u_hat @ a).float()
