"""Pruning: threshold (Han et al.), L1-filter (Li et al.), channel-union (PruneTrain).

``prune_(model, config, train_data=..., val_data=...)`` runs the method registered for the config's
type; each method is one object (``ThresholdPruner``, ``L1FilterPruner``, ``ChannelUnionPruner``)
that your own training loop can drive too (``compress.ThresholdPruner`` and kin are public names).
"""

from __future__ import annotations

from compress.method import prune_
from compress.prune import taylor  # noqa: F401  (registers the "taylor" importance)
from compress.prune.channel_union import ChannelUnionConfig, ChannelUnionPruner
from compress.prune.importance import IMPORTANCES, register_importance
from compress.prune.l1_filter import L1FilterConfig, L1FilterPruner, ratios_for_budget, sensitivity
from compress.prune.threshold import ThresholdConfig, ThresholdPruner, sparsity_of

__all__ = [
    "IMPORTANCES",
    "ChannelUnionConfig",
    "ChannelUnionPruner",
    "L1FilterConfig",
    "L1FilterPruner",
    "ThresholdConfig",
    "ThresholdPruner",
    "prune_",
    "ratios_for_budget",
    "register_importance",
    "sensitivity",
    "sparsity_of",
]
