"""Uniform per-channel grids: min-max and MMSE-optimal clipping.

MMSE: the clipping value per channel that minimises the mean squared error of the quantized
weights (Choukroun et al., "Low-bit Quantization of Neural Networks for Efficient Inference",
ICCVW 2019). The search starts from Banner et al.'s ACIQ closed form for Laplace-distributed
weights (alpha* = c_b * b, b the mean absolute deviation) and scans a grid of clipping values
around it that always includes min-max, so MMSE is never worse than min-max.

With ``rd_lambda`` > 0 the grid is fitted as above and then each weight's code is chosen by rate and
distortion (``compress.quantize.rd``): the grid point of least (w - q·s)^2 + λσ²·rate_q, the rates from
the code frequencies over the whole tensor (one Huffman table per tensor), in units of each channel's step.
"""

from __future__ import annotations

import torch

from compress.quant_state import QuantState, Scheme, qrange, register_scheme
from compress.quantize.rd import rd_mu, rd_rounds

# ACIQ (Banner et al., "Post training 4-bit quantization of convolutional networks for rapid-deployment",
# NeurIPS 2019): optimal clipping for Laplace(b) at 2..8 bits, in units of b.
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}


def quantize_symmetric(w: torch.Tensor, clip: torch.Tensor, bits: int):
    """w (C, K), clip (C,) -> codes (C, K) int, scale (C,), dequantized (C, K)."""
    lo, hi = qrange(bits, True)
    scale = (clip / hi).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), lo, hi)
    return q, scale, q * scale[:, None]


def quantize_affine(w: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int):
    """Asymmetric grid over [min(wmin, 0), max(wmax, 0)] with an integer zero point (zero exact)."""
    lo, hi = qrange(bits, False)
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = ((wmax - wmin) / (hi - lo)).clamp_min(1e-12)
    zp = torch.clamp(torch.round(-wmin / scale), lo, hi)
    q = torch.clamp(torch.round(w / scale[:, None]) + zp[:, None], lo, hi)
    return q, scale, zp, (q - zp[:, None]) * scale[:, None]


def minmax(w: torch.Tensor, bits: int, symmetric: bool = True):
    """Per row of w (C, K): (codes, scale, zero_point, dequantized)."""
    if symmetric:
        q, s, dq = quantize_symmetric(w, w.abs().amax(1), bits)
        return q, s, torch.zeros_like(s), dq
    return quantize_affine(w, w.amin(1), w.amax(1), bits)


def mmse(w: torch.Tensor, bits: int, symmetric: bool = True, grid: int = 100):
    """Per row, the clipping that minimises ||w - Q(w)||^2 (exhaustive over a grid + ACIQ)."""
    amax = w.abs().amax(1).clamp_min(1e-12)
    nz = (w != 0).float()
    b = (w.abs() * nz).sum(1) / nz.sum(1).clamp_min(1)  # Laplace scale of the nonzero weights
    aciq = (ACIQ_LAPLACE.get(bits, 9.89) * b).clamp(max=amax)
    fracs = torch.linspace(0.05, 1.0, grid, dtype=w.dtype)
    cands = torch.cat([fracs[:, None] * amax[None, :], aciq[None, :]], 0)  # (G+1, C)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for clip in cands:
        if symmetric:
            _, _, dq = quantize_symmetric(w, clip, bits)
        else:
            ratio = clip / amax
            _, _, _, dq = quantize_affine(w, w.amin(1) * ratio, w.amax(1) * ratio, bits)
        err = (w - dq).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    if symmetric:
        q, s, dq = quantize_symmetric(w, best, bits)
        return q, s, torch.zeros_like(s), dq
    ratio = best / amax
    return quantize_affine(w, w.amin(1) * ratio, w.amax(1) * ratio, bits)


def rd_grid(
    mat: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool, lam: float
) -> torch.Tensor:
    """The grid integers q (C, K) moved by rate and distortion; pruned zeros keep theirs (zero exactly)."""
    lo, hi = qrange(bits, symmetric)
    live = mat != 0
    if int(live.sum()) < 2:
        return q
    s = scale.double().clamp_min(1e-12)
    u = mat.double() / s[:, None] + zp.double()[:, None]  # in grid units: the weight is (q - zp)·s
    levels = torch.arange(lo, hi + 1, dtype=torch.float64)
    mu = rd_mu(mat[live], lam) / s**2  # each channel's trade in units of its own step
    idx = rd_rounds(u, levels, (q - lo).long(), mu, live)
    return (idx + lo).to(q.dtype)


class GridScheme(Scheme):
    """A uniform grid per channel, fitted row by row by ``rows(w (C, K), bits, symmetric)``."""

    storage = "grid"
    rate_distortion = True
    rows: staticmethod

    def fit(self, w, bits, per_channel=True, symmetric=True, rd_lambda=0.0):
        per_channel = per_channel and w.dim() > 1
        mat = w.flatten(1) if per_channel else w.reshape(1, -1)  # (C, K)
        q, scale, zp, _ = self.rows(mat, bits, symmetric)
        if rd_lambda:
            q = rd_grid(mat, q, scale, zp, bits, symmetric, rd_lambda)
        lo, _ = qrange(bits, symmetric)
        return QuantState(
            bits,
            self.name,
            (q - lo).to(torch.uint8),
            scale.float(),
            None if symmetric else zp.float(),
            per_channel=per_channel,
        )


@register_scheme
class MinMax(GridScheme):
    """A uniform grid over each channel's range."""

    name = "minmax"
    rows = staticmethod(minmax)


@register_scheme
class MMSE(GridScheme):
    """A uniform grid clipped where the squared error is least (Choukroun et al.)."""

    name = "mmse"
    rows = staticmethod(mmse)
