"""Pruning: threshold (Han et al.), L1-filter (Li et al.), channel-union (PruneTrain).

``prune_(model, config, train_data=..., val_data=...)`` dispatches on the config's type; the
per-method functions ``threshold``, ``l1_filter`` and ``channel_union`` build the config for you.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import Config, handler_for
from .channel_union import ChannelUnionConfig, channel_union
from .l1_filter import L1FilterConfig, l1_filter, plot_sensitivity, ratios_for_budget, sensitivity
from .threshold import ThresholdConfig, sparsity_of, threshold


def prune_(model: nn.Module, config: Config, train_data=None, val_data=None, **kw) -> nn.Module:
    """Apply a pruning config in place; returns the model for chaining."""
    return handler_for(config, "prune_")(model, config, train_data=train_data, val_data=val_data, **kw)


__all__ = ["ChannelUnionConfig", "L1FilterConfig", "ThresholdConfig", "channel_union", "l1_filter",
           "plot_sensitivity", "prune_", "ratios_for_budget", "sensitivity", "sparsity_of", "threshold"]
