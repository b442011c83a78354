"""Weight quantization: INT8 / INT4 (any 2..8 bits) by min-max, MMSE clipping or k-means sharing.

``quantize_(model, QuantConfig(bits=4, scheme="mmse"))`` replaces each chosen layer's weight by
values that lie exactly on its grid (float tensors holding dequantized values) and records the grid
in ``module.compress_quant`` (bits, scheme, scale / zero point or codebook), so that the .cpz
container stores the integer codes exactly. Zeros stay exactly zero: a pruned model stays as sparse.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math

import torch
import torch.nn as nn

from ..config import Config, handler_for, per_layer, register_handler
from ..io import add_history
from ..train import TrainConfig, fit
from . import kmeans as km
from . import uniform

log = logging.getLogger(__name__)
SCHEMES = ("minmax", "mmse", "kmeans")
QUANT_ATTR = "compress_quant"


@dataclasses.dataclass(frozen=True)
class QuantConfig(Config):
    """Args:
        bits: bits per weight, 2..8; an int, or a dict keyed by FQN or layer type ("conv", "linear")
            with "_default" (Han et al. use conv=8, linear=5).
        scheme: "minmax" (grid over the channel's range), "mmse" (clipping that minimises the
            squared error) or "kmeans" (a shared 2^bits codebook per layer).
        per_channel: one grid per output channel (uniform schemes); False for one per tensor.
        symmetric: symmetric grid with zero exact; False for an affine grid with an integer zero point.
        layers: glob patterns of layer FQNs to quantize; default every Conv2d and Linear.
        epochs: fine-tuning epochs after quantizing (kmeans: the centroids; uniform: none).
        lr: centroid learning rate (Adam).
    """

    bits: int | dict = 8
    scheme: str = "minmax"
    per_channel: bool = True
    symmetric: bool = True
    layers: tuple = ()
    epochs: float = 0.0
    lr: float = 1e-4

    def __post_init__(self):
        for b in (self.bits.values() if isinstance(self.bits, dict) else [self.bits]):
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                raise ValueError(f"bits must be an integer in 2..8, got {b!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")


def _type_key(m):
    return "conv" if isinstance(m, nn.Conv2d) else "linear"


def targets(model: nn.Module, config: QuantConfig):
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (
                not config.layers or any(fnmatch.fnmatch(n, p) for p in config.layers)):
            yield n, m


def sqnr_db(w: torch.Tensor, dq: torch.Tensor) -> float:
    noise = float((w - dq).double().pow(2).sum())
    sig = float(w.double().pow(2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)


def quantize_tensor(w: torch.Tensor, bits: int, scheme: str, per_channel=True, symmetric=True):
    """-> (dequantized like w, info dict). Zeros stay zero."""
    if scheme == "kmeans":
        codes, cb, dq = km.quantize_kmeans(w, bits)
        return dq, {"bits": bits, "scheme": scheme, "codebook": cb}
    mat = w.detach().flatten(1) if per_channel else w.detach().reshape(1, -1)
    fn = uniform.mmse if scheme == "mmse" else uniform.minmax
    _, scale, zp, dq = fn(mat, bits, symmetric)
    dq = dq + 0.0  # -0.0 -> +0.0: a stored zero is a zero
    return dq.view_as(w), {"bits": bits, "scheme": scheme, "scale": scale.float(), "zero_point": zp.float(),
                           "symmetric": symmetric, "per_channel": per_channel}


def codes_of(module: nn.Module) -> tuple[torch.Tensor, dict]:
    """Recover the integer codes of a quantized layer's weight exactly from its recorded grid.

    Uniform: (C, K) unsigned codes (symmetric grids shifted by 2^(bits-1) - 1). Codebook: flat
    indices into the codebook, -1 where the weight is an exact (pruned) zero.
    """
    info = getattr(module, QUANT_ATTR)
    w = module.weight.detach()
    if "codebook" in info:
        cb = info["codebook"]
        flat = w.flatten()
        codes = km.assign(flat, cb)
        codes = torch.where(flat == 0, torch.full_like(codes, -1), codes)
        if not torch.equal(torch.where(codes >= 0, cb[codes.clamp_min(0)], torch.zeros_like(flat)), flat):
            raise ValueError("weights are off their codebook (changed after quantization?)")
        return codes, info
    mat = w.flatten(1) if info.get("per_channel", True) else w.reshape(1, -1)
    scale, zp = info["scale"], info["zero_point"]
    q = torch.round(mat / scale[:, None]) + zp[:, None]
    if not torch.equal((q - zp[:, None]) * scale[:, None], mat):
        raise ValueError("weights are off their grid (changed after quantization?)")
    lo, _ = uniform.qrange(info["bits"], info.get("symmetric", True))
    return (q - lo).long(), info


@register_handler(QuantConfig)
def _quantize(model: nn.Module, config: QuantConfig, train_data=None, val_data=None) -> nn.Module:
    rows, shared = [], {}
    for name, m in targets(model, config):
        bits = per_layer(config.bits, name, per_layer(config.bits, _type_key(m), 8))
        w = m.weight.detach().clone()
        dq, info = quantize_tensor(w, bits, config.scheme, config.per_channel, config.symmetric)
        with torch.no_grad():
            m.weight.copy_(dq)
        setattr(m, QUANT_ATTR, info)
        if config.scheme == "kmeans":
            shared[name] = (m, km.layer_codes(m, info["codebook"]), info["codebook"])
        rows.append({"name": name, "bits": bits, "scheme": config.scheme, "mse": float((w - dq).pow(2).mean()),
                     "sqnr_db": round(sqnr_db(w, dq), 2), "zeros": int((dq == 0).sum()), "params": w.numel()})
    if config.scheme == "kmeans" and train_data is not None and config.epochs > 0:
        trainer = km.CentroidTrainer(shared)
        fit(model, train_data, TrainConfig(epochs=config.epochs, lr=config.lr), params=trainer.params(),
            after_backward=trainer.after_backward, on_step=trainer.on_step, desc="k-means centroids")
        km.finalize({n: v[0] for n, v in shared.items()}, trainer.codebooks())
    add_history(model, {"stage": "quantize", "config": config.to_dict(), "layers": rows})
    return model


def quantize_(model: nn.Module, config: QuantConfig, train_data=None, val_data=None) -> nn.Module:
    """Quantize weights in place; returns the model for chaining."""
    return handler_for(config, "quantize_")(model, config, train_data, val_data)


def quantize(model: nn.Module, config: QuantConfig | None = None, train_data=None, val_data=None, **kw) -> nn.Module:
    return quantize_(model, config or QuantConfig(**kw), train_data, val_data)


__all__ = ["QuantConfig", "codes_of", "quantize", "quantize_", "quantize_tensor", "sqnr_db"]
