"""Compression inside a training loop you already run (plain, DDP or torchrun).

    pruner = ThresholdPruner(model, ThresholdConfig(sparsity=0.9, steps=3), steps_per_round=1000)
    for x, y in loader:
        loss = criterion(ddp_model(x), y)
        loss.backward()
        pruner.after_backward()     # pruned weights get no gradient (so no optimizer state)
        optimizer.step()
        pruner.step()               # masks hold; the next round prunes more on schedule
    model = pruner.apply()          # exact zeros, no mask machinery

``ChannelUnionPruner`` adds PruneTrain's proximal group-lasso step and reconfigures every
``interval`` steps; ``step()`` returns True when the architecture changed, which is when you
rebuild your optimizer (and re-wrap DDP). ``KMeansFinetuner`` trains shared centroids. Every
decision is a deterministic function of the weights, so under DDP (whose gradients are all-reduced)
every rank makes the same one; write files from rank 0 only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import distributed, masks
from .prune.channel_union import ChannelUnionConfig, GroupLasso, lasso_lambda, reconfigure
from .prune.threshold import ThresholdConfig, _step_targets, apply_thresholds, thresholds
from .quantize import QuantConfig, quantize_
from .quantize import kmeans as km
from .quantize.kmeans import CentroidTrainer


class ThresholdPruner:
    """Iterative threshold pruning on your schedule: round k prunes at step (k-1) * steps_per_round."""

    def __init__(self, model: nn.Module, config: ThresholdConfig, steps_per_round: int):
        if steps_per_round < 1:
            raise ValueError("steps_per_round must be >= 1")
        self.model, self.config, self.steps_per_round = model, config, steps_per_round
        self.targets = list(_step_targets(config))
        self.round, self.steps = 0, 0
        self._next_round()

    def _next_round(self) -> None:
        if self.round < len(self.targets):
            apply_thresholds(self.model, thresholds(self.model, self.config, self.targets[self.round]))
            self.round += 1

    def after_backward(self) -> None:
        masks.mask_grads(self.model)

    def step(self) -> None:
        masks.enforce(self.model)
        self.steps += 1
        if self.steps % self.steps_per_round == 0:
            self._next_round()

    def apply(self) -> nn.Module:
        masks.remove_masks(self.model)
        return self.model


class ChannelUnionPruner:
    """Proximal group lasso after each step; removes zero channels every ``interval`` steps."""

    def __init__(self, model: nn.Module, config: ChannelUnionConfig, input_shape, interval: int,
                 num_classes: int = 10):
        self.model, self.config, self.interval = model, config, interval
        self.lasso = GroupLasso(model, input_shape)
        self.lam = lasso_lambda(config, num_classes)
        self.steps = 0
        self.records: list[dict] = []

    def penalty(self) -> torch.Tensor:
        return self.lam * self.lasso.value()

    def step(self, lr: float) -> bool:
        """Call after optimizer.step(); True when the model was reconfigured."""
        self.lasso.prox(lr * self.lam)
        self.steps += 1
        if self.steps % self.interval:
            return False
        distributed.sync_buffers(self.model)
        removed = reconfigure(self.model, self.lasso, self.config)
        self.records.append({"step": self.steps, "removed": removed})
        return bool(removed)

    def apply(self) -> nn.Module:
        return self.model


class KMeansFinetuner:
    """k-means weight sharing, then centroid training inside your loop."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        if config.scheme != "kmeans":
            raise ValueError("KMeansFinetuner needs scheme='kmeans'")
        quantize_(model, config)
        layers = {name: (m, km.layer_codes(m, m.compress_quant["codebook"]), m.compress_quant["codebook"])
                  for name, m in model.named_modules() if "codebook" in getattr(m, "compress_quant", {})}
        self.model, self.trainer = model, CentroidTrainer(layers)

    def parameters(self):
        """The centroids: give these (and only these) to your optimizer."""
        return self.trainer.params()

    def after_backward(self) -> None:
        self.trainer.after_backward(self.model)

    def step(self) -> None:
        self.trainer.on_step(self.model)

    def apply(self) -> nn.Module:
        km.finalize(dict(self.model.named_modules()), self.trainer.codebooks())
        return self.model
