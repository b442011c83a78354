"""Weight sharing by k-means, as in Deep Compression (Han et al., ICLR 2016): one codebook of
2^bits centroids per layer, linear initialisation over [min, max] of the (nonzero) weights, Lloyd
iterations, then optional fine-tuning of the centroids where each centroid's gradient is the sum of
the gradients of the weights that share it. Pruned weights (exact zeros) are not clustered and stay
zero.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.quant_state import QuantState, Scheme, get_state, register_scheme, set_state
from compress.quantize.rd import RateModel, entropy_rates, rd_assign, rd_mu, rd_rounds


def lloyd_1d(values: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """1-D k-means with linear initialisation; returns sorted centroids (k,)."""
    v = values.double()
    if v.numel() == 0:
        return torch.zeros(k)
    lo, hi = float(v.min()), float(v.max())
    c = torch.linspace(lo, hi, k, dtype=torch.float64)
    for _ in range(iters):
        idx = assign(v, c)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, v)
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        new, _ = new.sort()
        if torch.allclose(new, c, atol=1e-12, rtol=0):
            break
        c = new
    return c.float()


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (centroids sorted ascending)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(mids.to(values.dtype).contiguous(), values.contiguous())


def half_exact(cb: torch.Tensor) -> torch.Tensor:
    """Centroids rounded to float16 values (the container then stores them in 2 bytes each);
    unchanged when they lie outside float16's range."""
    if cb.numel() and float(cb.abs().max()) < 60000:
        return cb.half().float()
    return cb


def _compact(c: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroids some index uses, sorted, and the indices renumbered to match."""
    used = torch.bincount(idx, minlength=len(c)) > 0
    keep = torch.nonzero(used).flatten()
    c_kept, order = c[keep].sort()
    new = torch.empty(len(c), dtype=torch.long)
    new[keep[order]] = torch.arange(len(keep))
    return c_kept, new[idx]


def ecvq_1d(
    values: torch.Tensor, k: int, lam: float, iters: int = 30, rate_model: RateModel = entropy_rates
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy-constrained 1-D k-means from Lloyd's codebook: (centroids (<= k,) sorted and float16-exact,
    indices (N,) into them), each value at the centroid of least (v - c)^2 + λσ²·rate."""
    v = values.double()
    c = lloyd_1d(values, k, iters).double()
    mu = rd_mu(v, lam)
    idx = assign(v, c)
    for _ in range(iters):
        new = rd_assign(v, c, rate_model(torch.bincount(idx, minlength=len(c))), mu)
        counts = torch.bincount(new, minlength=len(c)).double()
        sums = torch.zeros(len(c), dtype=torch.float64).index_add_(0, new, v)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        if torch.equal(new, idx) and torch.allclose(moved, c, atol=1e-12, rtol=0):
            break
        c, idx = _compact(moved, new)  # the cells are intervals, so the means stay in order; empty ones go
    cb = half_exact(c.float()).double()
    idx = rd_rounds(v, cb, idx, mu, rate_model=rate_model)  # on the stored (float16) values
    cb, idx = _compact(cb, idx)
    return cb.float(), idx


def quantize_kmeans(w: torch.Tensor, bits: int, iters: int = 30, rd_lambda: float = 0.0):
    """w (any shape) -> (codes int64 with -1 for pruned zeros, codebook (<= 2^bits,), dequantized).
    ``rd_lambda`` > 0: entropy-constrained (``ecvq_1d``); 0: nearest centroid, the codebook 2^bits."""
    flat = w.detach().flatten()
    nz = flat != 0
    codes = torch.full_like(flat, -1, dtype=torch.long)
    if rd_lambda and int(nz.sum()) > 1:
        cb, idx = ecvq_1d(flat[nz], 2**bits, rd_lambda, iters)
        codes[nz] = idx
    else:
        cb = half_exact(lloyd_1d(flat[nz], 2**bits, iters))
        codes[nz] = assign(flat[nz].float(), cb)
    dq = torch.zeros_like(flat)
    dq[nz] = cb[codes[nz]].to(flat.dtype) + 0.0
    return codes.view_as(w), cb, dq.view_as(w)


@register_scheme
class KMeans(Scheme):
    """A shared codebook of 2^bits centroids per layer (Han et al.), trainable."""

    name = "kmeans"
    storage = "codebook"
    trainable = True
    rate_distortion = True

    def fit(self, w, bits, per_channel=True, symmetric=True, rd_lambda=0.0):
        codes, cb, _ = quantize_kmeans(w, bits, rd_lambda=rd_lambda)
        return QuantState(bits, self.name, codes.flatten().to(torch.int16), codebook=cb)


class CentroidTrainer:
    """Fine-tunes the codebooks of k-means layers; the codes stay fixed.

    ``after_backward`` turns each layer's weight gradient into per-centroid sums (and clears the
    weight's own gradient: weights are not stepped); the optimizer steps the centroids;
    ``write_back`` puts the shared values into the weights; ``finalize`` sorts each codebook (the
    container's order), renumbers the codes to match and updates the layer's ``QuantState``.
    """

    def __init__(self, layers: dict[str, Any]):
        self.layers: dict[str, tuple[Any, QuantState, torch.Tensor, torch.nn.Parameter]] = {}
        for n, m in layers.items():
            st = get_state(m)
            if st is None or st.codebook is None:
                raise ValueError(f"{n}: no codebook to train (quantize it with a codebook scheme first)")
            self.layers[n] = (m, st, st.codes.flatten().long(), torch.nn.Parameter(st.codebook.clone().float()))

    def params(self):
        return [cb for _, _, _, cb in self.layers.values()]

    def after_backward(self) -> None:
        for m, _, codes, cb in self.layers.values():
            g = m.weight.grad
            if g is None:
                continue
            live = codes >= 0
            cb.grad = torch.zeros_like(cb).index_add_(0, codes[live], g.flatten()[live].to(cb.dtype).cpu())
            m.weight.grad = None  # the weights themselves are not stepped

    @torch.no_grad()
    def write_back(self) -> None:
        for m, _, codes, cb in self.layers.values():
            flat = torch.zeros(codes.numel(), dtype=m.weight.dtype)
            live = codes >= 0
            flat[live] = cb.detach()[codes[live]].to(flat.dtype)
            m.weight.copy_(flat.view_as(m.weight))

    @torch.no_grad()
    def finalize(self) -> None:
        for m, st, codes, cb in self.layers.values():
            cb_sorted, order = half_exact(cb.detach()).sort()
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            new = torch.where(codes >= 0, rank[codes.clamp_min(0)], codes)
            state = QuantState(st.bits, st.scheme, new.to(torch.int16), codebook=cb_sorted.clone())
            m.weight.copy_(state.dequantize(m.weight.shape).to(m.weight.device))
            set_state(m, state)
