"""SVD factorization of Linear and Conv2d layers (Denton et al. 2014; Jaderberg et al. 2014;
Zhang et al. 2015 for the k x k + 1 x 1 conv form).

* Linear (m x n): W ~ U_k S_k V_k^T -> Linear(n, k, bias=False) then Linear(k, m) with the bias.
* Conv2d (out, in, kh, kw): reshape W to out x (in*kh*kw); the first factor becomes a kh x kw conv
  with k filters (same stride, padding, dilation), the second a 1 x 1 conv with the bias.

The rank comes from the kept energy (sum of squared singular values), a ratio of full rank, or is
fixed. A layer is factorized only if it gets smaller: k (m + n) < m n. Grouped/depthwise convs are
left alone, and said so, and so are a conv stem and the classifier unless asked for (they are the
most sensitive: the stem's filters are short, and the classifier's rows are the classes; the first
Linear of an MLP is its largest layer and is factorized).
Truncation shifts activations, and the shift compounds through BatchNorm layers: when data is given,
BatchNorm statistics are re-estimated on it (no weight is trained) before any fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.nn as nn

from compress.bounds import bounded
from compress.config import Config, FineTune, Select, register_method
from compress.method import Method
from compress.train import recalibrate_bn

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FactorizeConfig(Config):
    """Args:
    energy: keep the smallest rank whose singular values hold this fraction of the squared sum.
    rank_ratio: rank = ceil(ratio x full rank).
    rank: a fixed rank (capped at full rank).
    select: layers to consider (``Select``); with ``spare_first_last`` a conv stem and the last
        layer are left alone unless ``select.names`` names them exactly.
    finetune: fine-tuning afterwards (``FineTune``; 0 epochs: none). With training data,
        BatchNorm statistics are re-estimated first either way.
    """

    verb = "factorize"
    stage_name = "factorize"
    search_key = "energy"

    energy: float | None = bounded(float, 0, 1, None, lo_open=True)
    rank_ratio: float | None = bounded(float, 0, 1, None, lo_open=True)
    rank: int | None = bounded(int, 1, 1_000_000, None)
    select: Select = dataclasses.field(default_factory=Select)
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(augment=0))

    def __post_init__(self):
        given = [v is not None for v in (self.energy, self.rank_ratio, self.rank)]
        if sum(given) != 1:
            raise ValueError("give exactly one of energy, rank_ratio or rank")


def choose_rank(s: torch.Tensor, config: FactorizeConfig) -> int:
    full = len(s)
    if config.rank is not None:
        return min(config.rank, full)
    if config.rank_ratio is not None:
        return max(1, min(full, int(torch.ceil(torch.tensor(config.rank_ratio * full)).item())))
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e / e[-1], torch.tensor(config.energy, dtype=torch.float64)).item()) + 1


def _weight_matrix(m: Any) -> torch.Tensor:
    return m.weight.detach().flatten(1).double()  # (out, in*kh*kw)


def factor_layer(m: Any, k: int) -> tuple[nn.Module, float]:
    """The two-layer replacement of ``m`` at rank k, and the relative reconstruction error."""
    W = _weight_matrix(m)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sq = S[:k].sqrt()
    A = (sq[:, None] * Vh[:k]).float()  # (k, in*kh*kw)
    B = (U[:, :k] * sq[None, :]).float()  # (out, k)
    err = float(torch.linalg.norm(W - (U[:, :k] * S[:k]) @ Vh[:k]) / torch.linalg.norm(W).clamp_min(1e-30))
    has_bias = m.bias is not None
    first: nn.Module
    second: nn.Module
    if isinstance(m, nn.Linear):
        first, second = nn.Linear(m.in_features, k, bias=False), nn.Linear(k, m.out_features, bias=has_bias)
        first.weight.data.copy_(A)
        second.weight.data.copy_(B)
    else:
        first = nn.Conv2d(
            m.in_channels, k, m.kernel_size, m.stride, m.padding, m.dilation, bias=False, padding_mode=m.padding_mode
        )
        second = nn.Conv2d(k, m.out_channels, 1, bias=has_bias)
        first.weight.data.copy_(A.view(k, m.in_channels, *m.kernel_size))
        second.weight.data.copy_(B.view(m.out_channels, k, 1, 1))
    if m.bias is not None and second.bias is not None:
        second.bias.data.copy_(m.bias.detach())
    seq = nn.Sequential(first, second).to(m.weight.device)
    return seq, err


def _eligible(m: nn.Module) -> str | None:
    """None if the layer can be factorized, else why not."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return "grouped/depthwise conv"
        return None
    if isinstance(m, nn.Linear):
        return None
    return "not a Linear or Conv2d"


_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@register_method(FactorizeConfig)
class Factorizer(Method):
    """Structural: ``attach`` replaces layers by their two-layer factorizations and re-estimates
    BatchNorm statistics on ``ctx.train``; then plain fine-tuning."""

    config: FactorizeConfig

    def attach(self) -> None:
        ends = self.select.ends(self.model)
        # modules that read a child's weight themselves (MultiheadAttention's out_proj, a transformer layer's
        # fast path its linear1/linear2) need those children whole
        self._held = {
            c: type(p).__name__
            for p in self.model.modules()
            if isinstance(p, _READS_CHILD_WEIGHTS)
            for c in p.children()
        }
        for name, m in self.select.layers(self.model):
            row = self._factor(name, m, ends)
            self.layers.append(row)
            if row["action"] == "kept":
                log.info("%s kept: %s", name, row["reason"])
        if self.ctx.train is not None and recalibrate_bn(self.model, self.ctx.train):
            log.info("BatchNorm statistics re-estimated on %d samples", min(1000, len(self.ctx.train)))
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            self.notes.append("without training data, BatchNorm statistics were not re-estimated")

    def _factor(self, name: str, m: Any, ends: set[str]) -> dict:
        why = _eligible(m)
        if why is None and m in self._held:
            why = f"its {self._held[m]} reads the weight itself"
        if why is None and name in ends:
            why = "first/last layer (name it in select.names / --layers to factorize it)"
        rows_, cols = m.weight.flatten(1).shape
        row = {
            "name": name,
            "type": type(m).__name__,
            "shape": list(m.weight.shape),
            "full_rank": min(rows_, cols),
            "params_before": sum(p.numel() for p in m.parameters()),
        }
        if why is None:
            k = choose_rank(torch.linalg.svdvals(_weight_matrix(m)), self.config)
            row["rank"] = k
            if k * (rows_ + cols) >= rows_ * cols:
                why = f"rank {k} would not be smaller"
        if why is not None:
            row.update(action="kept", reason=why, params_after=row["params_before"], error=0.0)
            return row
        seq, err = factor_layer(m, k)
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, seq)
        row.update(action="factorized", params_after=sum(p.numel() for p in seq.parameters()), error=err)
        return row
