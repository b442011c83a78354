"""Training from scratch, dense or as PruneTrain (Lym et al., SC 2019): the training time is the result.

``train_model`` trains a model on data and reports what the training cost: wall time per epoch, training MACs
(forward + backward ~ 3 x forward MACs per sample, summed as the model changes), the model's MACs, parameters and
batch size at each reconfiguration, and the validation score per epoch. With ``method="channel-union"`` the group
lasso of ``ChannelUnionPruner`` acts from the first step; every ``reconfig_every`` epochs zero channels are removed
(the union of kept channels over a residual stage; BatchNorm statistics re-estimated first), so every later step
computes less; the optimizer moves onto the smaller model with its momentum sliced to the kept channels; for the last
``freeze_last`` of the training the architecture is fixed and the pull off, so that accuracy recovers. With
``grow_batch`` the batch grows after each reconfiguration so that the activation memory of a step stays at its
starting level (capped at ``max_batch``), and the learning rate follows it (linear scaling rule).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from compress import distributed
from compress.config import FineTune
from compress.counting import count_macs, count_params
from compress.data import as_data, batches
from compress.errors import CompressError, InputError, UsageError, first_line
from compress.method import Context
from compress.progress import Bar, progress_enabled
from compress.prune.channel_union import (
    ChannelUnionConfig,
    ChannelUnionPruner,
    carry_momentum,
    stash_momentum,
)
from compress.scoring import evaluate, resolve_metric, to_device
from compress.train import check_augment, make_optimizer, random_shift, resolve_loss

log = logging.getLogger(__name__)

METHODS = ("channel-union",)
# the fewest channels a group keeps by default (measured, docs/methods.md: 1 left ResNet-20's first stage one channel
# wide and lost 1.00 pt against 2's 0.79; their times were not told apart)
MIN_CHANNELS = 2
BN_SAMPLES = 256  # BatchNorm statistics before a reconfiguration: 4 batches of 64 (1000 cost ~1.5 s a time on 2 cores)
CONVENTION = (
    "train_macs: forward + backward multiply-accumulates ~ 3 x the forward MACs of one sample (torch's FLOP "
    "counter / 2) x the samples trained on, summed step by step as the model changes; train_flops = 2 x train_macs. "
    "BatchNorm re-estimation and evaluation are not counted; wall_s is training alone (evaluation separate); "
    "cpu_s the process's CPU time over the same span (all threads; on a shared machine the fairer A/B measure)."
)


@dataclasses.dataclass
class TrainResult:
    """The trained model and the report of its training (``report``: JSON-ready)."""

    model: nn.Module
    report: dict


def train_bytes_per_sample(model: nn.Module, input_shape) -> int:
    """Activation bytes one training sample keeps for the backward pass: on a CUDA model the peak torch
    allocates for a forward + backward of 8 samples (less what it held before), per sample; elsewhere the
    sum of every leaf module's output bytes, counted on the meta device (nothing computed)."""
    dev = distributed.device_of(model)
    shape = (1, *tuple(input_shape)[1:])
    if dev.type == "cuda":
        was = model.training
        model.train()
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        saved = copy.deepcopy(model.state_dict())  # BatchNorm statistics are not moved by the probe
        out = model(torch.zeros((8, *shape[1:]), device=dev))
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        model.train(was)
        return max(1, (torch.cuda.max_memory_allocated(dev) - base) // 8)
    total = [0]

    def hook(m, inp, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    meta = copy.deepcopy(model).to("meta").train()
    hooks = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
    try:
        meta(torch.zeros(shape, device="meta"))
    except Exception as e:
        raise InputError(
            f"the model does not run on the meta device, so its memory cannot be counted ({first_line(e)})"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    return max(1, total[0] + math.prod(shape) * 4)


def _lr_at(base: float, seen: int, total: int) -> float:
    """Cosine decay to 1% of ``base`` over ``total`` samples."""
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(seen, total) / total)))


def check_settings(
    method: str | None,
    n: int,
    *,
    batch_size: int,
    target_macs: float | None = None,
    target_params: float | None = None,
    freeze_last: float = 0.25,
    reconfig_every: float = 0.25,
    grow_batch: bool = False,
    max_batch: int | None = None,
    cost_weight: float = 1.0,
    min_channels: int = MIN_CHANNELS,
) -> int | None:
    """UsageError, before any work, for settings that cannot be met on ``n`` training samples; returns the
    batch's cap under ``grow_batch`` (default 4 x ``batch_size``, at most ``n``)."""
    if method is not None and method not in METHODS:
        raise UsageError(f"--method {method!r}: expected one of {', '.join(METHODS)} (or none: dense training)")
    for name, v in (("target-macs", target_macs), ("target-params", target_params)):
        if v is not None and not 0.0 < v <= 1.0:
            raise UsageError(f"--{name} {v}: expected a fraction of the starting model's in (0, 1]")
        if v is not None and method is None:
            raise UsageError(f"--{name} needs --method channel-union (dense training keeps every channel)")
    if not 0.0 <= freeze_last < 1.0:
        raise UsageError(f"--freeze-last {freeze_last}: expected a fraction in [0, 1)")
    if not 0.0 <= cost_weight <= 4.0:
        raise UsageError(f"--cost-weight {cost_weight}: expected an exponent in [0, 4] (0: all pulled alike)")
    if not 0.0 < reconfig_every <= 1000:
        raise UsageError(f"--reconfig-every {reconfig_every}: expected epochs in (0, 1000]")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or not 1 <= min_channels <= 1_000_000:
        raise UsageError(f"--min-channels {min_channels}: expected a whole number of channels in [1, 1000000]")
    if grow_batch:
        cap = max_batch if max_batch is not None else 4 * batch_size
        if method is None:
            raise UsageError("--grow-batch needs --method channel-union: a dense model frees no memory to grow into")
        if cap <= batch_size or batch_size >= n:
            raise UsageError(
                f"--grow-batch: the batch of {batch_size} cannot grow (cap {cap}, {n} training samples); "
                "give --max-batch above --batch-size, or a smaller --batch-size"
            )
        max_batch = min(cap, n)
    return max_batch


def train_model(
    model: nn.Module,
    train,
    *,
    val=None,
    test=None,
    method: str | None = None,
    epochs: float = 10,
    lr: float = 0.05,
    optimizer: str = "sgd",
    batch_size: int = 64,
    augment: int = 0,
    seed: int = 0,
    weight_decay: float = 1e-4,
    target_macs: float | None = None,
    target_params: float | None = None,
    lasso_ratio: float = 0.8,
    cost_weight: float = 1.0,
    reconfig_every: float = 0.25,
    freeze_last: float = 0.25,
    min_channels: int = MIN_CHANNELS,
    grow_batch: bool = False,
    max_batch: int | None = None,
    loss: Any = None,
    metric: Any = None,
    progress: Callable[[str], None] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``train`` (anything ``compress.data.as_data`` takes) and report the cost.

    ``method``: None (dense) or "channel-union" (PruneTrain). ``cost_weight``: the pull on a channel group
    scales with (its channels' MACs / the mean's) ** cost_weight (``ChannelUnionConfig.cost_weight``).
    ``target_macs`` / ``target_params``: fractions in
    (0, 1] of the starting model's; the pull stops once reached and what is left above the target when the
    architecture freezes is removed by L1 ranking. ``reconfig_every``: epochs between reconfigurations (0.5: twice
    an epoch). ``freeze_last``: the fraction of the training, at its end, with the architecture fixed.
    ``min_channels``: the fewest channels a group keeps (``ChannelUnionConfig.min_channels``; 2 here: a residual
    stream pulled down to one channel trained less accurately; docs/methods.md). ``val`` is scored
    after every epoch, ``test`` at the end. ``progress(line)`` gets a line per epoch; a progress bar (``desc``)
    shows on a terminal."""
    data = as_data(train, "training data", arg="train")
    val = as_data(val, "validation data", arg="val") if val is not None else None
    test = as_data(test, "test data", arg="test") if test is not None else None
    if data.iterable:
        raise UsageError("compress train needs training data of known length (not an iterable loader)")
    n = len(data)
    max_batch = check_settings(
        method, n, batch_size=batch_size, target_macs=target_macs, target_params=target_params,
        freeze_last=freeze_last, reconfig_every=reconfig_every, grow_batch=grow_batch, max_batch=max_batch,
        cost_weight=cost_weight, min_channels=min_channels,
    )  # fmt: skip
    cfg = FineTune(
        epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, augment=augment, seed=seed,
        weight_decay=weight_decay,
    )  # fmt: skip
    check_augment(augment, data)
    loss_fn, metric = resolve_loss(loss), resolve_metric(metric)
    shape = (1, *tuple(data.sample_shape))
    dev = distributed.device_of(model)
    total = int(round(epochs * n))
    chunk = max(1, int(round(reconfig_every * n))) if method is not None else n
    freeze_at = int(round((1.0 - freeze_last) * total))
    say = progress or (lambda line: None)

    pruner = None
    if method == "channel-union":
        ccfg = ChannelUnionConfig(
            lasso_ratio=lasso_ratio, cost_weight=cost_weight, target_macs=target_macs, target_params=target_params,
            finetune=cfg, min_channels=min_channels,
        )  # fmt: skip
        pruner = ChannelUnionPruner(
            model, ccfg, Context(train=data, input_shape=shape), interval=0, bn_samples=BN_SAMPLES
        )
        pruner.attach()
        pruner.interval, pruner.per_epoch = 0, None  # reconfigured here, at chunk ends; no 3/4 top-up of its own

    def measure() -> tuple[int, int]:
        m = count_macs(model, shape)
        model.train()
        return m, count_params(model)

    macs, params = measure()
    base_macs, base_params = macs, params
    mem0 = train_bytes_per_sample(model, shape) if grow_batch else None
    bs, scale = batch_size, 1.0
    report: dict[str, Any] = {
        "method": method or "dense",
        "convention": CONVENTION,
        "data": {"train": data.name, "train_samples": n, "val": val.name if val is not None else None},
        "settings": {
            "epochs": epochs,
            "lr": lr,
            "optimizer": optimizer,
            "batch_size": batch_size,
            "augment": augment,
            "seed": seed,
            "weight_decay": weight_decay,
            "device": str(dev),
        },  # fmt: skip
        "start": {"macs": macs, "params": params},
        "epochs": [],
        "reconfigurations": [],
    }
    if method is not None:
        report["settings"].update(
            lasso_ratio=lasso_ratio, cost_weight=cost_weight, reconfig_every=reconfig_every, freeze_last=freeze_last,
            target_macs=target_macs, target_params=target_params, grow_batch=grow_batch, max_batch=max_batch,
            min_channels=min_channels,
        )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    rng = torch.random.fork_rng(devices=[])
    rng.__enter__()
    torch.manual_seed(seed)
    opt = make_optimizer(model.parameters(), cfg)
    model.train()
    seen, frozen, step, next_reconf = 0, pruner is None, 0, chunk
    train_macs = 0
    bar = Bar(progress_enabled(), math.ceil(total / batch_size), desc)
    wall_total = eval_total = cpu_total = 0.0
    try:
        epoch = 0
        while seen < total:
            epoch += 1
            order = torch.randperm(n, generator=g)[: total - seen]
            t0, c0 = time.perf_counter(), time.process_time()
            ep_loss, ep_count, ep_macs, reconf_s = 0.0, 0, 0, 0.0
            pos = 0
            while pos < len(order):  # in parts that end where the architecture may change (or freezes)
                stop = len(order)
                if pruner is not None and not frozen:
                    stop = min(stop, pos + max(1, min(next_reconf, freeze_at) - seen))
                part, pos = order[pos:stop], stop
                for x, y in batches(data, bs, part, train=True, pin=dev.type == "cuda"):
                    if augment and x.dim() == 4:
                        x = random_shift(x, augment, g)
                    x, y = x.to(dev, non_blocking=True), to_device(y, dev)
                    rate = _lr_at(lr * scale, seen, total)
                    for group in opt.param_groups:
                        group["lr"] = rate
                    try:
                        value = loss_fn(model(x), y)
                    except CompressError:
                        raise
                    except Exception as e:
                        if isinstance(e, (torch.cuda.OutOfMemoryError, KeyboardInterrupt)):
                            raise
                        raise InputError(f"training on a batch of {data.name} failed: {type(e).__name__}: "
                                         f"{first_line(e)}") from e  # fmt: skip
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    opt.step()
                    if pruner is not None and pruner.lam > 0:  # the proximal step (none once the pull is off)
                        pruner.step(rate)
                    step += 1
                    seen += len(x)
                    ep_macs += 3 * macs * len(x)
                    ep_loss += float(value.detach()) * len(x)
                    ep_count += len(x)
                    bar.update(f"loss {ep_loss / ep_count:.3f}  epoch {epoch}")
                if pruner is None or frozen or seen >= total or seen < min(next_reconf, freeze_at):
                    continue
                next_reconf = seen + chunk
                # a reconfiguration (and at the freeze point the last one): BatchNorm re-estimated, zeros removed
                r0 = time.perf_counter()
                freezing = seen >= freeze_at
                removed = pruner.reconfigure(opt)  # opt moved onto the new parameters, momentum kept
                if freezing:
                    frozen = True
                    if pruner.target is not None:
                        what, wanted, meas = pruner.target
                        if meas(model) / pruner.base_measure > wanted * 1.02:
                            carry = stash_momentum(model, opt)
                            removed.update(pruner._top_up(f"at {seen / total:.0%} of the training (frozen after)"))
                            carry_momentum(pruner.model, opt, carry)
                            pruner._count()
                    pruner.lam = 0.0
                elif pruner.lam == 0:  # the target was reached and the pull stopped: no channel will reach zero now
                    freezing = frozen = True
                model = pruner.model
                before = macs
                macs, params = pruner.counts["macs"], pruner.counts["params"]  # counted once, by the pruner
                rec: dict[str, Any] = {
                    "epoch": round(seen / n, 3), "step": step, "macs": macs, "params": params,
                    "removed_channels": sum(v for v in removed.values() if isinstance(v, int)),
                    "removed_branches": sum(1 for v in removed.values() if v == "branch"),
                    "frozen": freezing,
                }  # fmt: skip
                if mem0 is not None and max_batch is not None and macs != before:
                    mem = train_bytes_per_sample(model, shape)
                    new_bs = max(bs, min(max_batch, int(batch_size * mem0 / mem)))
                    rec.update(bytes_per_sample=mem, start_bytes_per_sample=mem0)
                    if new_bs != bs:
                        bs, scale = new_bs, new_bs / batch_size
                rec.update(batch=bs, lr_scale=round(scale, 4))
                report["reconfigurations"].append(rec)
                model.train()
                reconf_s += time.perf_counter() - r0
                say(
                    f"reconfigured at epoch {rec['epoch']}: {macs / base_macs:.3f} of the MACs, "
                    f"{params / base_params:.3f} of the params, batch {bs}"
                    + (" (frozen from here)" if freezing else "")
                )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            wall_total += wall
            cpu_total += cpu
            train_macs += ep_macs
            row: dict[str, Any] = {
                "epoch": epoch, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "reconfigure_s": round(reconf_s, 3),
                "samples": ep_count, "train_macs": ep_macs, "loss": round(ep_loss / max(ep_count, 1), 5), "macs": macs,
                "params": params, "batch": bs,
            }  # fmt: skip
            if val is not None:
                e0 = time.perf_counter()
                row["val_score"] = round(evaluate(model, val, metric), 3)
                model.train()
                eval_total += time.perf_counter() - e0
            report["epochs"].append(row)
            say(
                f"epoch {epoch}: {wall:.1f} s, loss {row['loss']:.4f}"
                + (f", val {row['val_score']:.2f}" if "val_score" in row else "")
                + f", {macs / base_macs:.3f} of the MACs"
            )
    finally:
        rng.__exit__(None, None, None)
        bar.close()
    if pruner is not None:
        model = pruner.finalize()
        report["notes"] = list(pruner.notes)
    model.eval()
    macs, params = count_macs(model, shape), count_params(model)
    report["total"] = {
        "wall_s": round(wall_total, 3), "cpu_s": round(cpu_total, 3), "eval_s": round(eval_total, 3),
        "train_macs": train_macs, "train_flops": 2 * train_macs, "epochs": len(report["epochs"]), "steps": step,
    }  # fmt: skip
    report["final"] = {
        "macs": macs, "params": params, "macs_fraction": round(macs / base_macs, 4),
        "params_fraction": round(params / base_params, 4),
    }  # fmt: skip
    if val is not None:
        report["final"]["val_score"] = round(evaluate(model, val, metric), 3)
    if test is not None:
        report["final"]["test_score"] = round(evaluate(model, test, metric), 3)
    report["final"]["metric"] = metric.label
    return TrainResult(model, report)
