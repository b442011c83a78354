"""The one training loop: zoo training and every fine-tuning step share it.

Seeded, with a progress bar, Adam or SGD, cosine learning-rate decay. Masks hold throughout
(pruned weights and their gradients stay zero). An optional ``penalty(model) -> tensor`` is added
to the loss (group lasso). Under torchrun (``torch.distributed`` initialised) it shards the data
with a DistributedSampler-style split and only rank 0 shows progress.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, masks
from .progress import Bar, progress_enabled
from .data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Args:
        epochs: passes over the training data.
        lr: peak learning rate (cosine decay to 1% over the run).
        optimizer: "adam" or "sgd" (momentum 0.9, nesterov).
        batch_size: samples per step (per process under torchrun).
        weight_decay: L2 weight decay.
        seed: seeds shuffling and initialisation-independent randomness.
        augment: random shifts of up to this many pixels (0: none). Images only; keeps a model
            from learning its training writers' quirks (MNIST's test writers are others).
    """

    epochs: float = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    augment: int = 0

    def __post_init__(self):
        if self.augment < 0:
            raise ValueError("augment must be >= 0")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


def random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in x and y (zero fill). x: (N, C, H, W)."""
    n, _, h, w = x.shape
    p = F.pad(x, (pixels, pixels, pixels, pixels))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]  # (N, 1, W)
    return p[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``n`` samples (per process under torchrun)."""
    _, world = distributed.rank_world()
    return max(1, math.ceil(n / world / batch_size))


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig | None = None, *, method=None,
        desc: str = "train", progress: bool | None = None) -> list[dict]:
    """Train ``model`` in place; returns one dict per epoch (loss, penalty).

    ``method`` (a ``compress.stages.Method``) is driven as a user's loop would drive it: its
    ``penalty()`` is added to the loss, ``after_backward()`` runs before the optimizer step and
    ``step(lr)`` after it; when ``step`` says the architecture changed, the optimizer (and DDP) are
    rebuilt around ``method.model``. Its ``parameters()`` (if any) are what the optimizer trains.
    """
    cfg = cfg or TrainConfig()
    if method is None and masks.has_masks(model):
        method = masks.Keeper(model)
    rank, world = distributed.rank_world()
    dev = distributed.device_of(model)
    show = (progress if progress is not None else progress_enabled()) and rank == 0
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    whole, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    total_steps = per_epoch * whole + int(round(per_epoch * frac))
    if total_steps == 0:
        return []

    def schedule(optimizer, offset=0):  # cosine decay to 1% of lr over all steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.01 + 0.99 * 0.5 * (
            1 + math.cos(math.pi * min(s + offset, total_steps) / total_steps)))

    def trained_params():
        own = method.parameters() if method is not None else None
        return own if own is not None else model.parameters()

    opt = make_optimizer(trained_params(), cfg)
    sched = schedule(opt)
    history, step = [], 0
    bar = Bar(show, total_steps, desc)
    net = distributed.wrap(model)  # DDP under torchrun; gradients are all-reduced in backward
    model.train()
    epoch = 0
    try:
        while step < total_steps:
            perm = torch.randperm(n, generator=g)
            if world > 1:  # DistributedSampler-style: same permutation everywhere, padded, strided
                perm = torch.cat([perm, perm[: (-n) % world]])[rank::world]
            tot_loss = tot_pen = 0.0
            count = 0
            for i in range(per_epoch):
                if step >= total_steps:
                    break
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                if len(idx) == 0:
                    break
                x, y = data.x[idx], data.y[idx]
                if cfg.augment:
                    x = random_shift(x, cfg.augment, g)
                x, y = x.to(dev), y.to(dev)
                loss = F.cross_entropy(net(x), y)
                pen = method.penalty() if method is not None else None
                total = loss + pen if pen is not None else loss
                opt.zero_grad(set_to_none=True)
                total.backward()
                if method is not None:
                    method.after_backward()
                opt.step()
                sched.step()
                if method is not None and method.step(sched.get_last_lr()[0]):
                    model = method.model  # the architecture changed: new parameters, new optimizer state
                    net = distributed.wrap(model)  # and DDP re-wrapped around the rebuilt model
                    opt = make_optimizer(trained_params(), cfg)
                    sched = schedule(opt, offset=step + 1)
                    model.train()
                step += 1
                tot_loss += float(loss.detach()) * len(idx)
                tot_pen += float(pen.detach()) * len(idx) if pen is not None else 0.0
                count += len(idx)
                bar.update(f"loss {tot_loss / count:.3f}  epoch {epoch + 1}")
            distributed.sync_buffers(model)
            history.append({"epoch": epoch + 1, "loss": tot_loss / max(count, 1), "penalty": tot_pen / max(count, 1)})
            log.info("%s epoch %d: loss %.4f", desc, epoch + 1, history[-1]["loss"])
            epoch += 1
    finally:
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    was = model.training
    model.eval()
    dev = distributed.device_of(model)
    out = torch.cat([model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    logits = predict(model, data.x, batch_size)
    return 100.0 * float((logits.argmax(1) == data.y).float().mean())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, samples: int = 1000, batch_size: int = 100) -> bool:
    """Re-estimate BatchNorm running statistics on ``data`` (no weights change). Returns whether
    the model had any BatchNorm. Used after a change of weights that shifts activations (SVD)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was = model.training
    model.train()
    try:
        n = min(samples, len(data))
        dev = distributed.device_of(model)
        for i in range(0, n, batch_size):
            model(data.x[i:i + batch_size].to(dev))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return True
