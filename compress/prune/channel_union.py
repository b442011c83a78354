"""Channel-union reconfiguration, after PruneTrain (Lym et al., "PruneTrain: Fast Neural Network
Training by Dynamic Sparse Model Reconfiguration", SC 2019).

Training minimises loss + lambda * sum over channel groups g of w_g * sum_c ||g_c||_2 (group
lasso), solved by proximal gradient steps: after each optimizer step every channel's coupled slices
shrink together, and reach exact zeros. The group weight w_g is the group's current mean channel
norm. Why: in a BatchNorm network shrinking all channels of a layer alike changes nothing (the next
BatchNorm renormalises), so an unweighted penalty drives whole layers to zero at once or not at all;
weighted by the layer's own scale, the common part of the shrinkage is geometric and channels below
the layer's average lose ground until they reach zero, while the loss defends the useful ones.
``lasso_ratio`` is lambda relative to the loss of an untrained classifier, ln(classes): each step
shrinks a channel by lr * lasso_ratio * ln(classes) * w_g.

Every ``reconfig_interval`` epochs the zero channels are removed physically. A channel that rides a
residual stage's identity path is shared by every conv writing into the stage; it is removed only
where every one of those layers is zero (the kept channels are the union over them). A residual
block whose whole branch is zero becomes an identity (plus its constant offset).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import Config, register_handler
from ..io import add_history
from ..metrics import count_macs, count_params, input_shape_of
from ..train import TrainConfig, evaluate, fit, recalibrate_bn
from .graph import channel_groups, group_norms, member_norms, prune_group, scale_channels

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChannelUnionConfig(Config):
    """Args:
        lasso_ratio: strength of the group-lasso pull relative to the loss of an untrained classifier
            (see the module docstring); larger prunes more.
        reconfig_interval: epochs between reconfigurations (removal of zero channels).
        epochs: total training epochs.
        lr: learning rate (SGD with momentum, as PruneTrain).
        batch_size: samples per step. The penalty acts once per step, so fewer, larger batches
            prune less in the same epochs.
        zero_tol: a slice whose L2 norm is at most this counts as zero.
        rel_tol: a slice whose norm fell below this fraction of its layer's median slice norm counts
            as zero too (PruneTrain removes channels below a threshold, not only exact zeros).
        min_channels: never leave a group with fewer channels than this (a residual branch may
            still vanish whole).
    """

    lasso_ratio: float = 0.8
    reconfig_interval: int = 1
    epochs: float = 4.0
    lr: float = 0.02
    batch_size: int = 64
    zero_tol: float = 1e-8
    rel_tol: float = 0.1
    min_channels: int = 1

    def __post_init__(self):
        if self.lasso_ratio < 0:
            raise ValueError("lasso_ratio must be >= 0")
        if self.reconfig_interval < 1:
            raise ValueError("reconfig_interval must be >= 1")
        if self.epochs < 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0 and lr > 0")


class ResidualIdentity(nn.Module):
    """A residual block whose branch was removed: relu(shortcut(x) + offset).

    ``offset`` is a BatchNorm2d with zero scale, i.e. the per-channel constant the dead branch still
    added (its last BatchNorm's shift); as a BatchNorm it stays coupled to the stage's channels for
    later structural pruning.
    """

    def __init__(self, shortcut: nn.Module, offset: torch.Tensor):
        super().__init__()
        self.shortcut = shortcut
        self.offset = nn.BatchNorm2d(len(offset))
        with torch.no_grad():
            self.offset.weight.zero_()
            self.offset.bias.copy_(offset)

    def forward(self, x):
        s = self.shortcut(x)
        return F.relu(s + self.offset(s))


def lasso_lambda(config: ChannelUnionConfig, classes: int) -> float:
    """lambda = lasso_ratio x ln(classes), the loss of an untrained classifier."""
    return config.lasso_ratio * math.log(classes)


def _is_basic_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "shortcut"))


class GroupLasso:
    """The penalty over a model's channel groups, and its proximal operator."""

    def __init__(self, model: nn.Module, input_shape):
        self.input_shape = input_shape
        self.refresh(model)

    def refresh(self, model: nn.Module) -> None:
        self.dg, self.groups = channel_groups(model, self.input_shape, roots=(nn.Conv2d,))

    def value(self) -> torch.Tensor:
        """sum_g w_g * sum_c ||g_c|| with w_g the (constant) mean channel norm of group g."""
        total = 0.0
        for cg in self.groups:
            norm = group_norms(cg.group, cg.size).add(1e-12).sqrt()
            total = total + norm.mean().detach() * norm.sum()
        return total

    @torch.no_grad()
    def prox(self, step: float) -> None:
        """Shrink each channel's coupled slices by ``step * w_g`` in L2 norm (exact zero below it)."""
        for cg in self.groups:
            norm = group_norms(cg.group, cg.size).sqrt()
            live = norm[norm > 0]
            if len(live) == 0:
                continue
            scale = torch.clamp(1 - step * live.mean() / norm.clamp_min(1e-12), min=0.0)
            scale_channels(cg.group, scale)


def reconfigure(model: nn.Module, lasso: GroupLasso, config: ChannelUnionConfig) -> dict:
    """Remove channels that are zero in every coupled layer; dead residual branches -> identity."""
    names = {m: n for n, m in model.named_modules()}
    blocks = {m.conv1: m for m in model.modules() if _is_basic_block(m)}
    plan, dead_blocks = [], []
    for cg in lasso.groups:
        norms = torch.stack(member_norms(cg.group, cg.size))  # (members, size)
        tol = torch.clamp(config.rel_tol * norms.median(1, keepdim=True).values, min=config.zero_tol)
        zero = (norms <= tol).all(0)  # union: kept if any member is nonzero
        if bool(zero.all()) and cg.root in blocks:
            dead_blocks.append(blocks[cg.root])
            continue
        idxs = torch.nonzero(zero).flatten()
        keep = cg.size - len(idxs)
        if keep < config.min_channels:  # keep the strongest few
            order = norms.sum(0).argsort(descending=True)
            idxs = order[config.min_channels:]
        if len(idxs):
            plan.append((cg, idxs.tolist()))
    removed = {}
    for cg, idxs in plan:
        prune_group(lasso.dg, cg, idxs)
        removed[cg.name] = len(idxs)
    for blk in dead_blocks:
        name = names[blk]
        with torch.no_grad():
            bn = blk.bn2
            offset = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, ResidualIdentity(blk.shortcut, offset.detach().clone()))
        removed[name] = "branch"
    lasso.refresh(model)
    return removed


@register_handler(ChannelUnionConfig)
def _channel_union(model: nn.Module, config: ChannelUnionConfig, train_data=None, val_data=None,
                   input_shape=None, on_reconfig=None) -> nn.Module:
    if train_data is None:
        raise ValueError("channel-union pruning trains: give train_data")
    shape = input_shape or input_shape_of(model, train_data)
    lasso = GroupLasso(model, shape)
    classes = int(train_data.y.max()) + 1
    lam = lasso_lambda(config, classes)
    log.info("group lasso: lambda %.3g over %d channel groups", lam, len(lasso.groups))
    records = []

    def measure(m, epoch, removed):
        rec = {"epoch": epoch, "params": count_params(m), "macs": count_macs(m, shape), "removed": removed}
        if val_data is not None:
            rec["accuracy"] = round(evaluate(m, val_data), 3)
        records.append(rec)
        if on_reconfig is not None:
            on_reconfig(rec)
        return rec

    measure(model, 0, {})

    def on_epoch_end(m, epoch):
        if epoch % config.reconfig_interval:
            return None
        # The proximal steps rescale activations every step, so BatchNorm's running statistics lag
        # far behind (eval-mode accuracy reads ~10% while the weights are fine): re-estimate them,
        # on the same samples on every rank, before the offsets of dead branches are taken from them.
        recalibrate_bn(m, train_data)
        distributed.sync_buffers(m)
        removed = reconfigure(m, lasso, config)
        measure(m, epoch, removed)
        return m  # parameters were replaced: the optimizer must be rebuilt

    tc = TrainConfig(epochs=config.epochs, lr=config.lr, optimizer="sgd", batch_size=config.batch_size)
    fit(model, train_data, tc, on_step=lambda m, lr: lasso.prox(lr * lam), on_epoch_end=on_epoch_end,
        desc="channel-union")
    add_history(model, {"stage": "channel_union", "lambda": lam, "reconfigurations": records})
    return model


def channel_union(model: nn.Module, *, train_data, val_data=None, **kw) -> nn.Module:
    """Group-lasso training with periodic removal of zero channels; returns the (smaller) model."""
    return _channel_union(model, ChannelUnionConfig(**kw), train_data, val_data)
