"""Power-of-two (logarithmic) weights: every weight becomes 0 or ±s·2^-i, so a multiply is a shift.

Miyashita et al., "Convolutional Neural Networks using Logarithmic Data Representation" (2016), and
Zhou et al.'s INQ (ICLR 2017) keep such weights for hardware without multipliers. Here one scale ``s``
per layer is chosen where the squared error is least (a scan over two octaves below the largest
magnitude); a weight goes to the nearest of 0 and ±s·2^-i, i < n. With ``bits`` bits there are
n = 2^(bits-1) exponents, at most 16: below s·2^-15 a value adds nothing a zero does not.

The state is a codebook (the 2n values, sorted; -1 for zero), so the container stores it with no
new format and `compress inspect` shows it as scheme "pow2". Exact zeros (pruned weights) stay zero.
"""

from __future__ import annotations

import torch

from compress.quant_state import QuantState, Scheme, register_scheme
from compress.quantize.kmeans import assign, half_exact

MAX_EXPONENTS = 16
SCALE_STEPS = 41  # scale candidates: the largest magnitude times 2^-f, f in [0, 2]


def table(s: float, n: int) -> torch.Tensor:
    """The 2n values ±s·2^-i (i < n), sorted ascending."""
    mags = s * 2.0 ** -torch.arange(n, dtype=torch.float64)  # descending
    return torch.cat([-mags, mags.flip(0)]).float()


def quantize_pow2(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape) -> (codes int16, -1 for zero; table (2n,)) with the least squared error."""
    flat = w.detach().flatten().double()
    n = min(2 ** (bits - 1), MAX_EXPONENTS)
    nz = flat != 0
    amax = float(flat.abs().max()) if flat.numel() else 0.0
    codes = torch.full((flat.numel(),), -1, dtype=torch.int16)
    if amax == 0.0:
        return codes, table(1.0, n)
    vals = flat[nz]
    best_err, best = float("inf"), (table(amax, n), torch.zeros(0, dtype=torch.long))
    for f in torch.linspace(0, 2, SCALE_STEPS).tolist():
        tab = table(float(half_exact(torch.tensor([amax * 2.0**-f]))[0]), n)
        full = torch.cat([tab[:n], torch.zeros(1), tab[n:]]).double()  # zero in the middle
        idx = assign(vals, full)
        err = float((vals - full[idx]).pow(2).sum())
        if err < best_err:
            best_err, best = err, (tab, idx)
    tab, idx = best
    # index n is the zero; the values above it move down by one in the table without it
    codes[nz] = torch.where(idx == n, -1, torch.where(idx > n, idx - 1, idx)).to(torch.int16)
    return codes, tab


@register_scheme
class PowerOfTwo(Scheme):
    """Weights 0 or ±s·2^-i, one scale per layer (multiplies become shifts)."""

    name = "pow2"
    storage = "codebook"

    def fit(self, w, bits, per_channel=True, symmetric=True):
        codes, tab = quantize_pow2(w, bits)
        return QuantState(bits, self.name, codes, codebook=tab, per_channel=False)
