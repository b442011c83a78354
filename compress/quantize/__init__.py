"""Weight quantization: INT8 / INT4 (any 2..8 bits) by min-max, MMSE clipping, k-means sharing or
powers of two -- each a registered ``Scheme`` (``quant_state.register_scheme``; one file per scheme).

``quantize_(model, QuantConfig(bits=4, scheme="mmse"))`` replaces each chosen layer's weight by
values that lie exactly on its grid and puts a ``QuantState`` on the layer (its integer codes and
the grid or codebook they index), which the .cpz container stores as they are. Zeros stay exactly
zero: a pruned model stays as sparse. ``Quantizer`` is the method object; with k-means and
fine-tuning epochs it trains the shared centroids (each centroid's gradient is the sum of the
gradients of the weights that share it), in the library's loop or in yours.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn as nn

from compress.bounds import bounded
from compress.config import Config, FineTune, Select, check_keys, per_layer, register_method, uncovered
from compress.errors import safe
from compress.method import Method, quantize_
from compress.quant_state import SCHEMES, QuantState, Scheme, get_scheme, get_state, register_scheme, set_state
from compress.quantize import kmeans as km
from compress.quantize import pow2, uniform  # noqa: F401  (the built-in schemes register themselves)
from compress.quantize.rd import MAX_RD_LAMBDA, empirical_entropy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantConfig(Config):
    """Args:
    bits: bits per weight, 2..8; an int, or a dict keyed by FQN or layer type ("conv", "linear")
        with "_default" (Han et al. use conv=8, linear=5).
    scheme: a registered scheme: "minmax" (grid over the channel's range), "mmse" (clipping that
        minimises the squared error), "kmeans" (a shared 2^bits codebook per layer) or "pow2"
        (0 or ±s·2^-i per layer); ``register_scheme`` adds one.
    per_channel: one grid per output channel (uniform schemes); False for one per tensor.
    symmetric: symmetric grid with zero exact; False for an affine grid with an integer zero point.
    rd_lambda: rate-distortion trade, 0..10 (0: every weight to its nearest level, as before). Above 0 a
        weight goes to the level of least (w - c)^2 + λ·σ²·bits, σ² the variance of the layer's nonzero
        weights and bits the level's code length (-log2 of its frequency); k-means becomes
        entropy-constrained (ECVQ). 0.01-0.3 is the useful range at 3-4 bits: a smaller file for some
        squared error. Schemes "kmeans", "minmax" and "mmse".
    bias_bits: the biases of the quantized layers go on a symmetric per-tensor grid of this
        many bits (2..8; None keeps them float32). They are few, but in float32 they were the
        largest part of a pruned LeNet's file after its fc1 weights.
    select: layers to quantize (``Select``; every Conv2d and Linear by default).
    finetune: training of a trainable scheme's values (k-means centroids; ``FineTune``); other
        schemes are not trained.
    """

    verb = "quantize"
    stage_name = "quantize"
    search_key = "bits"
    also_searched = ("rd_lambda",)

    bits: int | dict = bounded(int, 2, 8, 8, per_layer=True)
    scheme: str = dataclasses.field(default="minmax", metadata={"choices": SCHEMES})
    per_channel: bool = bounded(bool, 0, 1, True)
    symmetric: bool = bounded(bool, 0, 1, True)
    rd_lambda: float = bounded(float, 0, MAX_RD_LAMBDA, 0.0)
    bias_bits: int | None = bounded(int, 2, 8, 8, optional=True)
    select: Select = dataclasses.field(default_factory=lambda: Select(spare_first_last=False))
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(epochs=0.0, lr=1e-4, augment=0))

    def __post_init__(self):
        if not isinstance(self.scheme, str) or self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {safe(self.scheme)}")
        if not self.per_channel or not self.symmetric:
            if SCHEMES[self.scheme].storage == "codebook":
                raise ValueError(
                    f"scheme {self.scheme!r} keeps one table per layer: "
                    "per_channel and symmetric apply to grid schemes only"
                )
        if self.rd_lambda and not SCHEMES[self.scheme].rate_distortion:
            rd = ", ".join(n for n, s in SCHEMES.items() if s.rate_distortion)
            raise ValueError(
                f"scheme {self.scheme!r} has no rate-distortion assignment: rd_lambda > 0 needs one of {rd}"
            )


def sqnr_db(w: torch.Tensor, dq: torch.Tensor) -> float:
    noise = float((w - dq).double().pow(2).sum())
    sig = float(w.double().pow(2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)


def code_entropy(state: QuantState, dq: torch.Tensor) -> float:
    """Bits per nonzero weight of the layer's codes (their empirical entropy): what the coder spends on them,
    about, and what ``rd_lambda`` trades against the squared error."""
    codes = state.codes.flatten().long()
    live = codes >= 0 if state.is_codebook else dq.flatten().cpu() != 0
    return empirical_entropy(codes[live], (1 << state.bits) + 1)


def quantize_tensor(
    w: torch.Tensor, bits: int, scheme: str, per_channel=True, symmetric=True, rd_lambda: float = 0.0
) -> QuantState:
    """The state of ``w`` under the named scheme; ``state.dequantize(w.shape)`` is the new weight.
    Zeros stay zero. ``rd_lambda`` > 0: levels chosen by rate and distortion (a ``rate_distortion`` scheme)."""
    s = get_scheme(scheme)
    w = w.detach().float().cpu()
    if not rd_lambda:
        return s.fit(w, bits, per_channel, symmetric)
    if not s.rate_distortion:
        raise ValueError(f"scheme {scheme!r} has no rate-distortion assignment (rd_lambda)")
    return s.fit(w, bits, per_channel, symmetric, rd_lambda=rd_lambda)  # type: ignore[call-arg]


def set_weight(module: nn.Module, state: QuantState, param: str = "weight") -> None:
    """Put ``state`` on ``module`` and its weight (or bias) exactly on the codes."""
    t = getattr(module, param)
    with torch.no_grad():
        t.copy_(state.dequantize(t.shape).to(t.device))
    set_state(module, state, param)


@register_method(QuantConfig)
class Quantizer(Method):
    """``attach`` puts every chosen layer on its grid or codebook. For k-means, ``parameters()`` are
    the centroids: give them (and only them) to your optimizer; ``after_backward`` turns weight
    gradients into centroid gradients and ``step`` writes the centroids back into the weights."""

    config: QuantConfig

    def attach(self) -> None:
        cfg = self.config
        layers = self.select.layers(self.model)
        # checked before anything changes
        check_keys(cfg.bits, [n for n, _ in layers], "--bits {key}: no quantized layer of that name")
        for name, m in layers:
            bits = per_layer(cfg.bits, name, m, 8)
            w = m.weight.detach().clone()
            state = quantize_tensor(w, bits, cfg.scheme, cfg.per_channel, cfg.symmetric, cfg.rd_lambda)
            set_weight(m, state)
            dq = m.weight.detach().cpu()
            if cfg.bias_bits is not None and m.bias is not None:
                set_weight(m, quantize_tensor(m.bias.detach(), cfg.bias_bits, "minmax", False, True), "bias")
            self.layers.append(
                {
                    "name": name,
                    "bits": bits,
                    "scheme": cfg.scheme,
                    "mse": float((w.cpu() - dq).pow(2).mean()),
                    "sqnr_db": round(sqnr_db(w.cpu(), dq), 2),
                    "zeros": int((dq == 0).sum()),
                    "entropy_bits": round(code_entropy(state, dq), 3),
                    "params": w.numel(),
                }
            )
        left = uncovered(self.model, layers)
        if left:
            self.notes.append(f"left in float32: {left}")
        self.trainer = None
        if SCHEMES[cfg.scheme].trainable:
            mods = dict(self.model.named_modules())
            self.trainer = km.CentroidTrainer({r["name"]: mods[r["name"]] for r in self.layers})

    def parameters(self):
        return self.trainer.params() if self.trainer is not None else None

    def after_backward(self) -> None:
        if self.trainer is not None:
            self.trainer.after_backward()

    def step(self, lr: float | None = None) -> bool:
        if self.trainer is not None:
            self.trainer.write_back()
        return False

    def fine_tune(self) -> None:
        if self.trainer is not None:  # uniform grids are not trained
            super().fine_tune()

    def finalize(self) -> nn.Module:
        if self.trainer is not None:
            self.trainer.finalize()
        return self.model


__all__ = [
    "SCHEMES",
    "QuantConfig",
    "QuantState",
    "Quantizer",
    "Scheme",
    "get_state",
    "quantize_",
    "quantize_tensor",
    "register_scheme",
    "get_scheme",
    "sqnr_db",
]
