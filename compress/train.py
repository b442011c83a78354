"""The one training loop: zoo training and every fine-tuning step share it.

Seeded, with a progress bar, Adam or SGD, cosine learning-rate decay. Masks hold throughout
(pruned weights and their gradients stay zero). An optional ``penalty(model) -> tensor`` is added
to the loss (group lasso). The loss is the user's (``loss(outputs, targets)``, default cross-entropy),
or a whole ``train_step(model, inputs, targets) -> loss``; with a ``teacher`` (the uncompressed model)
Hinton's distillation term is mixed in. Data are read in batches (``compress.data.batches``), with
loader processes when the data ask for them. Under torchrun (``torch.distributed`` initialised) each
rank reads its DistributedSampler-style share and only rank 0 shows progress.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import distributed, masks
from compress.config import FineTune
from compress.data import Data, as_data, batches
from compress.errors import CompressError, InputError, UsageError, first_line
from compress.progress import Bar, progress_enabled
from compress.scoring import to_device
from compress.user_code import resolve_callable

log = logging.getLogger(__name__)


def random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pixels`` in x and y (zero fill). x: (N, C, H, W)."""
    n, _, h, w = x.shape
    p = F.pad(x, (pixels, pixels, pixels, pixels))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=g)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, :, None]  # (N, H, 1)
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, :]  # (N, 1, W)
    shifted = p[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    # copied into plain NCHW strides: for one channel ``.contiguous()`` keeps strides that read as channels-last
    # too, and oneDNN's convolution backward then corrupted the heap once pruning left odd channel counts
    return x.new_empty(shifted.shape).copy_(shifted)


def check_augment(augment: int | None, data: Data) -> None:
    """Random shifts of up to ``augment`` pixels must fit the images of ``data`` (at most their side): a UsageError,
    said before any work, for more (the shift pads every batch by twice as many pixels)."""
    if not augment:
        return
    shape = data.sample_shape  # (C, H, W) for images; other inputs are not shifted
    if len(shape) == 3 and augment > min(shape[-2:]):
        raise UsageError(
            f"finetune.augment = {augment} is more than the side of the images of {data.name} "
            f"({min(shape[-2:])} pixels); give at most {min(shape[-2:])}"
        )


# ----------------------------------------------------------------------------- loss and metric
def cross_entropy(outputs: torch.Tensor, targets) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: KL(teacher || student) at ``temperature``, times T^2 (so its
    gradients keep their scale as T changes)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean"
    ) * (t * t)


def resolve_loss(loss=None) -> Callable:
    """None (cross-entropy), a callable ``loss(outputs, targets)`` or ``module:fn`` / ``file.py:fn``."""
    if loss is None:
        return cross_entropy
    if isinstance(loss, str):
        return resolve_callable(loss, what="--loss")
    if callable(loss):
        return loss
    raise ValueError(f"loss must be a callable or module:fn, got {loss!r}")


def make_optimizer(params, cfg: FineTune):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over ``n`` samples (per process under torchrun)."""
    _, world = distributed.rank_world()
    return max(1, math.ceil(n / world / batch_size))


def fit(
    model: nn.Module,
    data,
    cfg: FineTune | None = None,
    *,
    method=None,
    desc: str = "train",
    progress: bool | None = None,
    loss: Callable | None = None,
    train_step: Callable | None = None,
    teacher: nn.Module | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``data`` (anything ``compress.data.as_data`` takes); returns one dict per
    epoch (loss, penalty).

    ``method`` (a ``compress.method.Method``) is driven as a user's loop would drive it: its
    ``penalty()`` is added to the loss, ``after_backward()`` runs before the optimizer step and
    ``step(lr)`` after it; when ``step`` says the architecture changed, the optimizer (and DDP) are
    rebuilt around ``method.model``. Its ``parameters()`` (if any) are what the optimizer trains.
    ``loss(outputs, targets)`` (default cross-entropy) or ``train_step(model, inputs, targets) -> loss``
    is the task's loss; with a ``teacher`` and ``cfg.distill`` (a temperature) the loss is
    ``(1 - cfg.distill_weight) * task + cfg.distill_weight * distill_loss(student, teacher)``. With a
    ``train_step`` the student's outputs are those of ``model``'s last forward inside it (a hook), so the user's
    step is mixed with the same term. The teacher runs once per batch without gradients, on the batch as
    augmented (shifted inputs differ each epoch, so its outputs are not cached): about one more forward pass of
    the input model per step.
    """
    data = as_data(data, "training data", arg="data")
    cfg = cfg or FineTune(epochs=1)
    loss_fn = resolve_loss(loss)
    augment = cfg.augment or 0  # None (as the model was trained) is resolved by the stage; here: none
    keep_masks = method is None and masks.has_masks(model)  # masked weights get no gradient, stay zero
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
    check_augment(augment, data)
    if teacher is not None and cfg.distill and cfg.distill_weight > 0:
        teacher.eval()
    else:  # weight 0: the task loss alone, exactly, and no teacher forward paid for
        teacher = None

    def schedule(optimizer, offset=0):  # cosine decay to 1% of lr over all steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s + offset, total_steps) / total_steps)),
        )

    def trained_params():
        own = method.parameters() if method is not None else None
        return own if own is not None else model.parameters()

    captured: list = []

    def task_loss(net, x, y):
        try:
            if train_step is None:
                out = net(x)
                return loss_fn(out, y), out
            captured.clear()
            handle = model.register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                value = train_step(net, x, y)
            finally:
                handle.remove()
            return value, (captured[-1] if captured else None)
        except CompressError:
            raise
        except Exception as e:
            if isinstance(e, (torch.cuda.OutOfMemoryError, KeyboardInterrupt)):
                raise
            what = "train_step" if train_step is not None else f"loss {getattr(loss_fn, '__name__', '')}".strip()
            raise InputError(f"{what} failed on a batch of {data.name}: {type(e).__name__}: {first_line(e)}") from e

    opt = make_optimizer(trained_params(), cfg)
    sched = schedule(opt)
    history, step = [], 0
    bar = Bar(show, total_steps, desc)
    net = distributed.wrap(model)  # DDP under torchrun; gradients are all-reduced in backward
    model.train()
    epoch = 0
    rng = torch.random.fork_rng(devices=[])  # the data's random augmentation is seeded; the caller's RNG untouched
    rng.__enter__()
    torch.manual_seed(cfg.seed)
    try:
        while step < total_steps:
            order = None
            if not data.iterable:
                order = torch.randperm(n, generator=g)
                if world > 1:  # DistributedSampler-style: same permutation everywhere, padded, strided
                    order = torch.cat([order, order[: (-n) % world]])[rank::world]
                order = order[: min(len(order), (total_steps - step) * cfg.batch_size)]
            tot_loss = tot_pen = 0.0
            count = 0
            for x, y in batches(data, cfg.batch_size, order, train=True, pin=dev.type == "cuda"):
                if step >= total_steps:
                    break
                if augment and x.dim() == 4:
                    x = random_shift(x, augment, g)
                x, y = x.to(dev, non_blocking=True), to_device(y, dev)
                value, out = task_loss(net, x, y)
                if teacher is not None:
                    if not isinstance(out, torch.Tensor) or out.dim() != 2:
                        raise InputError(
                            "distillation (FineTune.distill, --distill) needs a model whose output is (batch, classes) "
                            "logits"
                        )
                    with torch.no_grad():
                        t_out = teacher(x)
                    value = (1 - cfg.distill_weight) * value + cfg.distill_weight * distill_loss(
                        out, t_out, cfg.distill or 1.0
                    )
                pen = method.penalty() if method is not None else None
                total = value + pen if pen is not None else value
                opt.zero_grad(set_to_none=True)
                total.backward()
                if method is not None:
                    method.after_backward()
                elif keep_masks:
                    masks.mask_grads(model)
                opt.step()
                sched.step()
                if keep_masks:
                    masks.enforce(model)
                if method is not None and method.step(sched.get_last_lr()[0]):
                    model = method.model  # the architecture changed: new parameters, new optimizer state
                    net = distributed.wrap(model)  # and DDP re-wrapped around the rebuilt model
                    opt = make_optimizer(trained_params(), cfg)
                    sched = schedule(opt, offset=step + 1)
                    model.train()
                step += 1
                tot_loss += float(value.detach()) * len(x)
                tot_pen += float(pen.detach()) * len(x) if pen is not None else 0.0
                count += len(x)
                bar.update(f"loss {tot_loss / count:.3f}  epoch {epoch + 1}")
            if count == 0:
                raise InputError(f"data {data.name}: no samples")
            distributed.sync_buffers(model)
            history.append({"epoch": epoch + 1, "loss": tot_loss / max(count, 1), "penalty": tot_pen / max(count, 1)})
            log.info("%s epoch %d: loss %.4f", desc, epoch + 1, history[-1]["loss"])
            epoch += 1
    finally:
        rng.__exit__(None, None, None)
        bar.close()
    model.eval()
    return history


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, samples: int = 1000, batch_size: int = 100) -> bool:
    """Re-estimate BatchNorm running statistics on ``data`` (no weights change). Returns whether
    the model had any BatchNorm. Used after a change of weights that shifts activations (SVD)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    data = as_data(data, arg="data")
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was = model.training
    model.train()
    try:
        dev = distributed.device_of(model)
        seen = 0
        order = None if data.iterable else torch.arange(min(samples, len(data)))
        for x, _ in batches(data, batch_size, order):
            model(x[: samples - seen].to(dev))
            seen += len(x)
            if seen >= samples:
                break
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return True
