"""The quantization state of one layer: its integer codes and the grid or codebook they index.

``quantize_`` sets one ``QuantState`` on every layer it changes (``module.compress_quant``) and
the layer's weight is exactly ``state.dequantize()``. The .cpz container writes ``state.codes``
as they are and builds the state again when it decodes, so no code is ever recovered by division.
A weight changed after quantization no longer matches its state; ``check`` says so.

This module is the contract between ``quantize`` (which makes states) and ``coding`` (which
stores them): it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from compress.errors import UsageError

QUANT_ATTR = "compress_quant"
PARAMS = ("weight", "bias")  # the parameters of a layer that may carry a state
STORAGES = ("grid", "codebook")  # how a state is stored: a uniform grid's scales, or a table of values


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer range of a grid: narrow and symmetric (zero exact), or 0..2^bits-1 (affine)."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


class Scheme:
    """A way of putting a weight on a finite set of values: one small class, registered by name.

    ``fit`` returns the weight's ``QuantState``; ``storage`` says which of the container's two
    stored forms that state takes ("grid": integer codes with per-channel scales and zero points;
    "codebook": codes into one table of at most 256 values, -1 for an exact zero), so a new scheme
    needs no new file format. ``trainable``: the table's values are trained during fine-tuning
    (each value's gradient is the sum of the gradients of the weights that share it).
    ``rate_distortion``: ``fit`` takes ``rd_lambda`` (weights go to the level of least squared error
    plus λ·σ² times its bits, ``compress.quantize.rd``); a scheme without it refuses λ > 0.
    """

    name: ClassVar[str]
    storage: ClassVar[str]
    trainable: ClassVar[bool] = False
    rate_distortion: ClassVar[bool] = False

    def fit(self, w: torch.Tensor, bits: int, per_channel: bool = True, symmetric: bool = True) -> QuantState:
        """The state of ``w`` (detached float32 on the CPU, as ``quantize_tensor`` passes it)."""
        raise NotImplementedError


SCHEMES: dict[str, Scheme] = {}


def schemes() -> dict[str, Scheme]:
    """Every registered scheme. The built-in ones register where they are defined (``compress.quantize``'s
    modules); a reader of files imports ``compress.quantize`` before it asks (``cpz.tensors`` does)."""
    return SCHEMES


def register_scheme(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: ``QuantConfig(scheme=cls.name)``, ``--scheme`` and the container then know it."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.replace("-", "").isalnum():
        raise ValueError(f"a scheme needs a short alphanumeric name, got {name!r}")
    if name in SCHEMES:
        raise ValueError(f"quantization scheme {name!r} is already registered")
    if getattr(cls, "storage", None) not in STORAGES:
        raise ValueError(f"scheme {name!r}: storage must be one of {', '.join(STORAGES)}")
    SCHEMES[name] = cls()
    return cls


def get_scheme(name: str) -> Scheme:
    """The registered scheme of that name; an unknown one is a UsageError listing the known ones."""
    s = schemes().get(name) if isinstance(name, str) else None
    if s is None:
        raise UsageError(f"unknown quantization scheme {name!r}; known: {', '.join(SCHEMES)}")
    return s


@dataclass(eq=False)
class QuantState:
    """Args:
    bits: bits per weight (2..8).
    scheme: the registered ``Scheme`` that made it ("minmax", "mmse", "kmeans", "pow2", ...).
    codes: grid: (C, K) unsigned codes, code - qrange's low end is the grid integer;
        codebook: flat int16 indices into ``codebook``, -1 where the weight is a pruned zero.
    scale: (C,) grid step per channel (grid).
    zero_point: (C,) integer zero point (affine grids), else None.
    codebook: (<= 2^bits,) sorted values (codebook).
    per_channel: one grid per output channel (grid), else one for the tensor.
    """

    bits: int
    scheme: str
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    per_channel: bool = True

    def __post_init__(self):
        if self.codebook is not None:
            self.per_channel = False  # one table per tensor

    @property
    def is_codebook(self) -> bool:
        return self.codebook is not None

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self, shape) -> torch.Tensor:
        """The float32 weight these codes stand for, computed as the quantizer computed it."""
        if self.codebook is not None:  # one gather: code -1 (a pruned zero) indexes the table's trailing 0
            table = torch.cat([self.codebook.float() + 0.0, torch.zeros(1)])
            codes = self.codes
            if len(table) <= 256 and codes.device.type == "cpu" and codes.dtype == torch.int16 and codes.numel():
                c = codes.numpy().reshape(-1)
                if c.min() >= -1 and c.max() < len(table):  # every code, and -1 as 255, is a byte
                    return torch.from_numpy(lookup_bytes(table[:-1].numpy(), c.astype(np.uint8))).view(shape)
            return table[codes.flatten().long()].view(shape)
        if self.scale is None:
            raise ValueError("a grid state needs its scales")
        lo, _ = qrange(self.bits, self.symmetric)
        q = self.codes.to(torch.float32) + lo  # (C, K)
        s = self.scale.float()[:, None]
        w = (q - self.zero_point.float()[:, None]) * s if self.zero_point is not None else q * s
        return (w + 0.0).reshape(shape)  # + 0.0: no negative zeros

    def check(self, weight: torch.Tensor, where: str = "layer") -> None:
        """Raise ValueError unless ``weight`` still equals the dequantized codes."""
        if not torch.equal(self.dequantize(weight.shape), weight.detach().cpu().float()):
            raise ValueError(
                f"{where}: weights are off their quantization grid (changed after quantization?); "
                "quantize again after the last change"
            )

    def to_dict(self) -> dict:
        """Plain description (no tensors) for reports."""
        return {"bits": self.bits, "scheme": self.scheme, "per_channel": self.per_channel, "symmetric": self.symmetric}


def lookup_bytes(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``values[codes]`` (float32) for uint8 ``codes``, 0 for a code at or past ``len(values)`` <= 255
    (a codebook's pruned zero, -1, is the byte 255).

    Looked up two codes at a time in a table of the 65536 pairs: half the gathers of a plain lookup,
    the costly part of decoding a large k-means layer."""
    lut = np.zeros(256, dtype="<f4")
    lut[: len(values)] = values
    n = len(codes)
    if n < 1 << 16:
        return lut[codes].astype(np.float32, copy=False)
    bits = lut.view("<u4").astype("<u8")
    pairs = (bits[None, :] | (bits[:, None] << np.uint64(32))).reshape(-1)  # [hi, lo]: lut[lo] then lut[hi]
    if n % 2:
        codes = np.append(codes, np.uint8(255))
    index = codes.view("<u2")
    out = np.empty(len(index), dtype="<u8")
    chunk = np.empty(min(len(index), _CHUNK), dtype=np.intp)  # indices as numpy takes them, a slice at a time
    for a in range(0, len(index), _CHUNK):
        b = min(a + _CHUNK, len(index))
        np.copyto(chunk[: b - a], index[a:b])
        pairs.take(chunk[: b - a], out=out[a:b], mode="wrap")
    return out.view("<f4")[:n].astype(np.float32, copy=False)


_CHUNK = 1 << 16


def _attr(param: str) -> str:
    if param not in PARAMS:
        raise ValueError(f"no quantization state for parameter {param!r}")
    return QUANT_ATTR if param == "weight" else f"{QUANT_ATTR}_{param}"


def get_state(module: nn.Module, param: str = "weight") -> QuantState | None:
    """The state of ``module.weight`` (or of ``module.bias`` with ``param="bias"``), or None."""
    s = getattr(module, _attr(param), None)
    return s if isinstance(s, QuantState) else None


def set_state(module: nn.Module, state: QuantState | None, param: str = "weight") -> None:
    attr = _attr(param)
    if state is None:
        if attr in module.__dict__:
            delattr(module, attr)
        return
    setattr(module, attr, state)


def quantized_layers(model: nn.Module):
    """(fqn, module, state) of every layer that carries a quantization state."""
    for name, m in model.named_modules():
        s = get_state(m)
        if s is not None:
            yield name, m, s


STATE_ATTRS = tuple(_attr(p) for p in PARAMS)  # module attributes that hold states
