"""Weight sharing by k-means, as in Deep Compression (Han et al., ICLR 2016): one codebook of
2^bits centroids per layer, linear initialisation over [min, max] of the (nonzero) weights, Lloyd
iterations, then optional fine-tuning of the centroids where each centroid's gradient is the sum of
the gradients of the weights that share it. Pruned weights (exact zeros) are not clustered and stay
zero.
"""
from __future__ import annotations

import torch


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


def quantize_kmeans(w: torch.Tensor, bits: int, iters: int = 30):
    """w (any shape) -> (codes int64 with -1 for pruned zeros, codebook (2^bits,), dequantized)."""
    flat = w.detach().flatten()
    nz = flat != 0
    cb = lloyd_1d(flat[nz], 2 ** bits, iters)
    codes = torch.full_like(flat, -1, dtype=torch.long)
    codes[nz] = assign(flat[nz].float(), cb)
    dq = torch.zeros_like(flat)
    dq[nz] = cb[codes[nz]].to(flat.dtype) + 0.0
    return codes.view_as(w), cb, dq.view_as(w)


class CentroidTrainer:
    """Fine-tunes codebooks inside the shared training loop.

    ``after_backward`` turns each layer's weight gradient into per-centroid sums; the optimizer steps
    the codebooks; ``on_step`` writes the shared values back into the weights.
    """

    def __init__(self, layers: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]):
        # fqn -> (module, codes (-1 = pruned), codebook)
        self.layers = {n: (m, codes, torch.nn.Parameter(cb.clone())) for n, (m, codes, cb) in layers.items()}

    def params(self):
        return [cb for _, _, cb in self.layers.values()]

    def after_backward(self, model) -> None:
        for m, codes, cb in self.layers.values():
            g = m.weight.grad
            if g is None:
                continue
            flat, c = g.flatten(), codes.flatten()
            live = c >= 0
            cb.grad = torch.zeros_like(cb).index_add_(0, c[live], flat[live].to(cb.dtype))
            m.weight.grad = None  # the weights themselves are not stepped

    @torch.no_grad()
    def on_step(self, model, lr=None) -> None:
        for m, codes, cb in self.layers.values():
            flat = torch.zeros(codes.numel(), dtype=m.weight.dtype)
            c = codes.flatten()
            live = c >= 0
            flat[live] = cb.detach()[c[live]].to(flat.dtype)
            m.weight.copy_(flat.view_as(m.weight))

    def codebooks(self) -> dict[str, torch.Tensor]:
        return {n: cb.detach().clone() for n, (_, _, cb) in self.layers.items()}


def layer_codes(module: torch.nn.Module, codebook: torch.Tensor) -> torch.Tensor:
    """Codes of a shared-weight layer: nearest centroid, -1 where the weight is an exact zero."""
    flat = module.weight.detach().flatten()
    codes = assign(flat, codebook)
    return torch.where(flat == 0, torch.full_like(codes, -1), codes).view_as(module.weight)


@torch.no_grad()
def finalize(modules: dict[str, torch.nn.Module], codebooks: dict[str, torch.Tensor]) -> None:
    """Store trained codebooks sorted (the container's order) and snap the weights onto them."""
    for name, cb in codebooks.items():
        m = modules[name]
        cb_sorted, _ = cb.sort()
        m.compress_quant = {**m.compress_quant, "codebook": cb_sorted}
        flat = m.weight.detach().flatten()
        m.weight.copy_(torch.where(flat == 0, flat, cb_sorted[assign(flat, cb_sorted)]).view_as(m.weight))
