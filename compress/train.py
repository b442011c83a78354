"""The one training loop: zoo training and every fine-tuning step share it.

Seeded, with a progress bar, Adam or SGD, cosine learning-rate decay. Masks hold throughout
(pruned weights and their gradients stay zero). An optional ``penalty(model) -> tensor`` is added
to the loss (group lasso). Under torchrun (``torch.distributed`` initialised) it shards the data
with a DistributedSampler-style split and only rank 0 shows progress.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .data import Dataset
from . import masks

log = logging.getLogger(__name__)


def progress_enabled() -> bool:
    """Progress bars on a terminal; COMPRESS_PROGRESS=0/1 forces them off/on."""
    env = os.environ.get("COMPRESS_PROGRESS")
    return env == "1" if env in ("0", "1") else sys.stderr.isatty()


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


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig | None = None, *,
        penalty: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        on_step: Callable[[nn.Module, float], None] | None = None,
        after_backward: Callable[[nn.Module], None] | None = None,
        on_epoch_end: Callable[[nn.Module, int], nn.Module | None] | None = None,
        params: list | None = None, desc: str = "train", progress: bool | None = None) -> list[dict]:
    """Train ``model`` in place; returns one dict per epoch (loss, penalty).

    ``penalty(model, loss)`` is added to the loss; ``after_backward(model)`` may rewrite gradients; ``on_step(model, lr)`` runs after each optimizer step;
    ``on_epoch_end(model, epoch)`` may return a *new* model (e.g. after a reconfiguration), for which
    the optimizer is rebuilt.
    """
    cfg = cfg or TrainConfig()
    rank, world = distributed.rank_world()
    dev = distributed.device_of(model)
    show = (progress if progress is not None else progress_enabled()) and rank == 0
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    steps_per_epoch = max(1, math.ceil(n / world / cfg.batch_size))
    whole, frac = int(cfg.epochs), cfg.epochs - int(cfg.epochs)
    total_steps = steps_per_epoch * whole + int(round(steps_per_epoch * frac))
    if total_steps == 0:
        return []

    def schedule(optimizer, offset=0):  # cosine decay to 1% of lr over all steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.01 + 0.99 * 0.5 * (
            1 + math.cos(math.pi * min(s + offset, total_steps) / total_steps)))

    opt = make_optimizer(params if params is not None else model.parameters(), cfg)
    sched = schedule(opt)
    history, step = [], 0
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    net = distributed.wrap(model)  # DDP under torchrun; gradients are all-reduced in backward
    model.train()
    epoch = 0
    while step < total_steps:
        perm = torch.randperm(n, generator=g)
        if world > 1:  # DistributedSampler-style: same permutation everywhere, padded, strided
            perm = torch.cat([perm, perm[: (-n) % world]])[rank::world]
        tot_loss = tot_pen = 0.0
        count = 0
        for i in range(steps_per_epoch):
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
            pen = penalty(model, loss) if penalty is not None else None
            total = loss + pen if pen is not None else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            masks.mask_grads(model)
            if after_backward is not None:
                after_backward(model)
            opt.step()
            sched.step()
            masks.enforce(model)
            if on_step is not None:
                on_step(model, sched.get_last_lr()[0])
            step += 1
            tot_loss += float(loss.detach()) * len(idx)
            tot_pen += float(pen.detach()) * len(idx) if pen is not None else 0.0
            count += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{tot_loss / count:.3f}", epoch=epoch + 1)
        distributed.sync_buffers(model)
        history.append({"epoch": epoch + 1, "loss": tot_loss / max(count, 1), "penalty": tot_pen / max(count, 1)})
        log.info("%s epoch %d: loss %.4f", desc, epoch + 1, history[-1]["loss"])
        if on_epoch_end is not None:
            new = on_epoch_end(model, epoch + 1)
            if new is not None:
                model = new  # the architecture changed: new parameters, new optimizer state
                net = distributed.wrap(model)  # and DDP re-wrapped around the rebuilt model
                opt = make_optimizer(model.parameters(), cfg)
                sched = schedule(opt, offset=step)
            model.train()
        epoch += 1
    if bar is not None:
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
