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

Every ``reconfig_interval`` epochs the zero channels are removed physically, after BatchNorm
statistics are re-estimated (the proximal steps leave them far behind). A channel that rides a
residual stage's identity path is shared by every conv writing into the stage; it is removed only
where every one of those layers is zero (the kept channels are the union over them). A residual
block whose whole branch is zero becomes an identity (plus its constant offset).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from compress import distributed
from compress.bounds import bounded
from compress.config import Config, FineTune, Select, Selection, register_method
from compress.counting import count_macs, count_params
from compress.data import TensorData
from compress.method import Context, Method, needs_data
from compress.models.blocks import ResidualIdentity
from compress.prune.graph import ChannelGroup, channel_groups, group_norms, member_norms, prune_group, unselected
from compress.prune.l1_filter import check_targets, global_counts, prune_filters, resolve_target, target_note
from compress.prune.slices import channel_costs, group_slices, scale_slices, slices_sq_norms
from compress.train import recalibrate_bn, steps_per_epoch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChannelUnionConfig(Config):
    """Args:
    lasso_ratio: strength of the group-lasso pull relative to the loss of an untrained classifier
        (see the module docstring); larger prunes more.
    cost_weight: each group's pull times (its channels' MACs / the mean channel's) ** cost_weight: 0 pulls
        every channel alike; 0.5 or 1 pull the costly ones harder (the high-resolution first stage of a ResNet,
        where a step's time goes), so that the same MACs go with less damage and more time saved.
    reconfig_interval: epochs between reconfigurations (removal of zero channels).
    zero_tol: a slice whose L2 norm is at most this counts as zero.
    rel_tol: a slice whose norm fell below this fraction of its layer's median slice norm counts
        as zero too (PruneTrain removes channels below a threshold, not only exact zeros).
    min_channels: never leave a group with fewer channels than this (a residual branch may
        still vanish whole).
    target_macs: instead of finding ``lasso_ratio`` by hand, prune to this many MACs (a fraction of the
        input's, or a count): the pull stops once the target is reached; what the group lasso has not
        removed by 3/4 of the training is removed then by L1 ranking across layers, and the last quarter
        fine-tunes the result (the note says how much each did).
    target_params: the same for parameters.
    select: convs whose output channels may be removed (``Select``); the rest keep theirs.
    finetune: the regularised training (``FineTune``): SGD with momentum as PruneTrain. The
        penalty acts once per step, so fewer, larger batches prune less in the same epochs.
    """

    verb = "prune"
    stage_name = "channel-union"
    search_key = "lasso_ratio"

    lasso_ratio: float = bounded(float, 0, 1000, 0.8)
    cost_weight: float = bounded(float, 0, 4, 0.0)
    reconfig_interval: int = bounded(int, 1, 10_000, 1)
    zero_tol: float = bounded(float, 0, 1, 1e-8)
    rel_tol: float = bounded(float, 0, 1, 0.1)
    min_channels: int = bounded(int, 1, 1_000_000, 1)
    target_macs: float | None = bounded(float, 0, 1e18, None, lo_open=True)  # and see l1_filter.check_targets
    target_params: float | None = bounded(float, 0, 1e15, None, lo_open=True)
    select: Select = dataclasses.field(default_factory=Select)
    finetune: FineTune = dataclasses.field(
        default_factory=lambda: FineTune(epochs=4.0, lr=0.02, optimizer="sgd", augment=0)
    )

    def __post_init__(self):
        check_targets(self)


def lasso_lambda(config: ChannelUnionConfig, classes: int) -> float:
    """lambda = lasso_ratio x ln(classes), the loss of an untrained classifier."""
    return config.lasso_ratio * math.log(classes)


def _is_basic_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2", "shortcut"))


class GroupLasso:
    """The penalty over a model's channel groups, and its proximal operator."""

    def __init__(
        self, model: nn.Module, input_shape, select: Select | Selection | None = None, cost_weight: float = 0.0
    ):
        self.input_shape, self.select, self.cost_weight = input_shape, select or Select(), cost_weight
        self.refresh(model)

    def refresh(self, model: nn.Module) -> None:
        self.dg, groups = channel_groups(
            model, self.input_shape, roots=(nn.Conv2d,), ignored=unselected(model, self.select)
        )
        self.groups = [cg for cg in groups if cg.blocked is None]  # channels that can be removed
        self.parts = [group_slices(cg.group, cg.size) for cg in self.groups]  # what prox reads and scales
        self.weights = [1.0] * len(self.groups)
        if self.cost_weight and self.groups:
            costs = [float(c.mean()) for c in channel_costs(model, self.groups, self.input_shape, "MACs")]
            mean = sum(c * cg.size for c, cg in zip(costs, self.groups, strict=True)) / sum(
                cg.size for cg in self.groups
            )
            self.weights = [(c / max(mean, 1e-12)) ** self.cost_weight for c in costs]

    def value(self) -> torch.Tensor:
        """sum_g w_g * sum_c ||g_c|| with w_g the (constant) mean channel norm of group g."""
        total = torch.zeros(())
        for cg in self.groups:
            norm = group_norms(cg.group, cg.size).add(1e-12).sqrt()
            total = total + norm.mean().detach() * norm.sum()
        return total

    @torch.no_grad()
    def prox(self, step: float) -> None:
        """Shrink each channel's coupled slices by ``step * w_g`` in L2 norm (exact zero below it)."""
        for cg, parts, w in zip(self.groups, self.parts, self.weights, strict=True):
            norm = slices_sq_norms(parts, cg.size).sqrt()
            mean = norm.sum() / (norm > 0).sum().clamp_min(1)  # over live channels (zeros add nothing to the sum)
            scale_slices(parts, torch.clamp(1 - step * w * mean / norm.clamp_min(1e-12), min=0.0))


@dataclasses.dataclass
class Removal:
    """What a reconfiguration would remove: per group the channels (root indexing) and how far each is below
    the removal threshold (its largest member norm over that member's threshold: 0 for exact zeros, < 1 all);
    residual blocks whose whole branch is zero, with the group of their first conv."""

    channels: list[tuple[ChannelGroup, torch.Tensor, torch.Tensor]]
    blocks: list[tuple[Any, ChannelGroup, float]]

    def __bool__(self) -> bool:
        return bool(self.channels or self.blocks)


def find_zeros(model: nn.Module, lasso: GroupLasso, config: ChannelUnionConfig) -> Removal:
    """The channels that are zero (below ``zero_tol`` or ``rel_tol`` x the member's median) in every coupled
    layer, and the residual blocks whose whole branch is zero. Reads weights only."""
    blocks = {m.conv1: m for m in model.modules() if _is_basic_block(m)}
    out = Removal([], [])
    for cg in lasso.groups:
        norms = torch.stack(member_norms(cg.group, cg.size))  # (members, size)
        tol = torch.clamp(config.rel_tol * norms.median(1, keepdim=True).values, min=config.zero_tol)
        rel = (norms / tol.clamp_min(torch.finfo(norms.dtype).tiny)).amax(0)  # at most 1: zero in every member
        zero = rel <= 1
        if bool(zero.all()) and cg.root in blocks:
            out.blocks.append((blocks[cg.root], cg, float(rel.max())))
            continue
        idxs = torch.nonzero(zero).flatten()
        if cg.size - len(idxs) < config.min_channels:  # keep the strongest few
            idxs = norms.sum(0).argsort(descending=True)[config.min_channels :]
        if len(idxs):
            out.channels.append((cg, idxs, rel[idxs]))
    return out


def cap_removal(removal: Removal, costs: dict[str, torch.Tensor], budget: float) -> Removal:
    """``removal`` cut so that what it saves (``costs``: per group name, per root channel) stays within
    ``budget``: the channels (and dead branches) furthest below the threshold go first, the strongest stay."""
    items = []  # (how far below the threshold, cost, what)
    for cg, idxs, rel in removal.channels:
        for i, r in zip(idxs.tolist(), rel.tolist(), strict=True):
            items.append((r, float(costs[cg.name][i]), ("c", cg, i)))
    for blk, cg, r in removal.blocks:
        items.append((r, float(costs[cg.name].sum()), ("b", blk, cg)))
    if sum(c for _, c, _ in items) <= budget:
        return removal
    chosen: dict[str, list[int]] = {}
    blocks = []
    spent = 0.0
    for r, c, w in sorted(items, key=lambda t: t[0]):
        if spent + c > budget:
            continue
        spent += c
        if w[0] == "b":
            blocks.append((w[1], w[2], r))
        else:
            chosen.setdefault(w[1].name, []).append(w[2])
    channels = []
    for cg, idxs, rel in removal.channels:
        picked = set(chosen.get(cg.name, ()))
        keep = [j for j, i in enumerate(idxs.tolist()) if i in picked]
        if keep:
            channels.append((cg, idxs[keep], rel[keep]))
    return Removal(channels, blocks)


def apply_removal(model: nn.Module, lasso: GroupLasso, removal: Removal) -> dict:
    """Remove the channels physically; dead residual branches -> identity (plus their constant offset)."""
    names = {m: n for n, m in model.named_modules()}
    removed: dict[str, int | str] = {}
    for cg, idxs, _ in removal.channels:
        if prune_group(lasso.dg, cg, idxs.tolist(), model, lasso.input_shape) is None:
            removed[cg.name] = len(idxs)
    for blk, _, _ in removal.blocks:
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


def reconfigure(model: nn.Module, lasso: GroupLasso, config: ChannelUnionConfig) -> dict:
    """Remove channels that are zero in every coupled layer; dead residual branches -> identity."""
    return apply_removal(model, lasso, find_zeros(model, lasso, config))


def stash_momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Before a reconfiguration: every parameter's name, and SGD's momentum put in its ``.grad`` (torch-pruning
    slices a parameter's ``.grad`` with it, so the buffers come out cut to the kept channels)."""
    names = {p: n for n, p in model.named_parameters()}
    carry: dict = {"names": {}, "momentum": any("momentum_buffer" in st for st in optimizer.state.values())}
    for group in optimizer.param_groups:
        for p in group["params"]:
            carry["names"][names.get(p)] = group
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            p.grad = buf.detach().clone() if buf is not None and carry["momentum"] else None
    return carry


def carry_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, carry: dict) -> None:
    """After a reconfiguration: ``optimizer`` holds the model's parameters now, each in the group its
    predecessor of the same name was in (new ones in the first), with SGD's momentum sliced to the kept
    channels; any other optimizer state starts afresh."""
    groups = {id(g): g for g in optimizer.param_groups}
    for g in optimizer.param_groups:
        g["params"] = []
    optimizer.state.clear()
    for name, p in model.named_parameters():
        group = carry["names"].get(name, optimizer.param_groups[0])
        groups[id(group)]["params"].append(p)
        if carry["momentum"] and p.grad is not None and p.grad.shape == p.shape:
            optimizer.state[p] = {"momentum_buffer": p.grad.detach().clone()}
        p.grad = None


@register_method(ChannelUnionConfig)
class ChannelUnionPruner(Method):
    """Proximal group lasso after every step; every ``interval`` steps, BatchNorm statistics are
    re-estimated and zero channels removed (``step`` then returns True: rebuild your optimizer).

    The library sets ``interval`` to ``reconfig_interval`` epochs of steps. BatchNorm statistics
    are re-estimated on ``ctx.train`` when given, else on the last batch the model saw.
    """

    config: ChannelUnionConfig

    needs_train = True

    def __init__(
        self,
        model: nn.Module,
        config: ChannelUnionConfig,
        ctx: Context | None = None,
        interval: int | None = None,
        num_classes: int | None = None,
        bn_samples: int = 1000,
    ):
        super().__init__(model, config, ctx)
        self.interval, self.num_classes = interval, num_classes
        self.steps = 0
        self._last_batch = None
        self._now: float | None = None  # the model's measure toward the target, as last counted
        self.bn_samples = bn_samples  # samples BatchNorm statistics are re-estimated on before a reconfiguration

    def attach(self) -> None:
        if self.ctx.train is None and self.interval is None:
            raise needs_data("channel-union trains")
        self.shape = self.ctx.shape(self.model)
        self.per_epoch = (
            steps_per_epoch(len(self.ctx.train), self.config.finetune.batch_size)
            if self.ctx.train is not None
            else None
        )
        if self.interval is None:
            self.interval = self.config.reconfig_interval * (self.per_epoch or 1)  # per_epoch: data checked above
        classes = self.num_classes or self._classes()
        self.lasso = GroupLasso(self.model, self.shape, self.select, self.config.cost_weight)
        self.lam = lasso_lambda(self.config, classes)
        log.info("group lasso: lambda %.3g over %d channel groups", self.lam, len(self.lasso.groups))
        self.target = resolve_target(self.config, self.model, self.shape)
        if self.target is not None:
            self.base_measure = self.target[2](self.model)
            total = self._total_steps()
            if total:  # at least 24 points to steer from: a reconfiguration removes no more than it must by much
                self.interval = max(1, min(self.interval, total // 24))
        if self.ctx.train is None:  # calibrate BatchNorm on what the user's loop feeds the model
            self._hook = self.model.register_forward_pre_hook(self._keep_batch)
        self._count()
        self._measure({})

    def _classes(self) -> int:
        """Classes for the penalty's scale: from the labels when known up front, else the model's outputs."""
        y = self.ctx.train.labels() if self.ctx.train is not None else None
        if y is not None and len(y):
            return int(y.max()) + 1
        with torch.no_grad():
            out = self.model.eval()(torch.zeros(self.shape, device=distributed.device_of(self.model)))
        self.model.train()
        return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else 10

    def _keep_batch(self, module, inputs):
        if module.training and inputs and isinstance(inputs[0], torch.Tensor):
            self._last_batch = inputs[0].detach()

    def lasso_value(self) -> torch.Tensor:
        """lambda x the group-lasso term, for logging. It is not added to the loss: the proximal
        step after each optimizer step is how the penalty acts (exact zeros, no oscillation)."""
        return self.lam * self.lasso.value()

    def step(self, lr: float | None = None, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """The proximal step after an optimizer step at learning rate ``lr``; every ``interval`` steps a
        reconfiguration. Returns True when the architecture changed: give ``optimizer`` and it is moved onto the
        new parameters in place (SGD's momentum sliced to the kept channels), else rebuild your optimizer."""
        if lr is None:
            raise ValueError("ChannelUnionPruner.step needs the learning rate of the step just taken")
        if self.lam > 0:
            self.lasso.prox(lr * self.lam)
        self.steps += 1
        if not self.interval or self.steps % self.interval:
            return False
        return bool(self.reconfigure(optimizer))

    def reconfigure(self, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Remove zero channels (never below a target: the channels furthest below the threshold go first),
        BatchNorm statistics re-estimated before (the same samples on every rank) when anything goes. With
        ``optimizer``, it is moved onto the new parameters (``carry_momentum``)."""
        removal = find_zeros(self.model, self.lasso, self.config)
        capped = False
        if removal and self.target is not None and self.lam > 0:
            removal, capped = self._within_target(removal)
        carry = stash_momentum(self.model, optimizer) if optimizer is not None else None
        removed: dict = {}
        if removal:
            calib = self.ctx.train
            if calib is None and self._last_batch is not None:
                calib = TensorData(self._last_batch.cpu(), torch.zeros(len(self._last_batch), dtype=torch.long))
            if calib is not None:
                recalibrate_bn(self.model, calib, samples=self.bn_samples)
            distributed.sync_buffers(self.model)
            removed = apply_removal(self.model, self.lasso, removal)
            self._count()
        if self.target is not None:
            more = self._steer(capped=capped)
            if more:
                removed.update(more)
                self._count()
        self._measure(removed)
        if carry is not None and optimizer is not None:
            carry_momentum(self.model, optimizer, carry)
        self.model.train()
        return removed

    def _within_target(self, removal: Removal) -> tuple[Removal, bool]:
        """``removal`` cut so that the model stays at or above the target; whether it was cut."""
        what, wanted, measure = self.target
        now = self._now if self._now is not None else measure(self.model)
        budget = now - wanted * self.base_measure
        costs = channel_costs(self.model, self.lasso.groups, self.shape, what)
        capped = cap_removal(removal, {cg.name: c for cg, c in zip(self.lasso.groups, costs, strict=True)}, budget)
        cut = capped is not removal
        if cut:
            n = sum(len(i) for _, i, _ in removal.channels) - sum(len(i) for _, i, _ in capped.channels)
            log.info("reconfiguration kept %d zero channels to stay at the target's %s", n, what)
        return capped, cut

    def _count(self) -> None:
        """The model's parameters and MACs, counted once per change (and the measure toward a target)."""
        params, macs = count_params(self.model), count_macs(self.model, self.shape)
        self.counts = {"params": params, "macs": macs}
        if self.target is not None:
            self._now = float({"MACs": macs, "parameters": params}[self.target[0]])

    def _measure(self, removed: dict) -> None:
        rec = {"step": self.steps, **self.counts, "removed": removed}
        if self.per_epoch:
            rec["epoch"] = round(self.steps / self.per_epoch, 2)
        if self.ctx.val is not None:
            rec["accuracy"] = round(self.ctx.score(self.model, self.ctx.val), 3)
        self.records.append(rec)
        if self.steps:
            self.ctx.emit("reconfigure", **rec)

    def _total_steps(self) -> int | None:
        return int(self.per_epoch * self.config.finetune.epochs) if self.per_epoch else None

    def _steer(self, capped: bool = False) -> dict:
        """Toward the target: the group lasso pulls at its strength and its zero channels go as usual, never
        below the target; once the target is reached, or the zeros would overshoot it, the pull stops (what
        is left above the target then goes by L1 ranking); at 3/4 of the training what is left above the
        target is removed by L1 ranking across layers (the channels the lasso weakened rank lowest), so that
        the last quarter fine-tunes the result. (Raising the pull to catch up collapsed small models: all
        channels shrink together and fall below the removal threshold at once.) Returns the channels removed."""
        what, wanted, measure = self.target
        if self._now is None:
            self._now = measure(self.model)
        frac = self._now / self.base_measure
        if frac <= wanted * 1.02:
            self.lam = 0.0
            return {}
        if capped:
            self.lam = 0.0
            return self._top_up(f"at step {self.steps}, where the zeros would have overshot the target")
        total = self._total_steps()
        if not total:
            return {}
        if self.steps >= 0.75 * total:
            self.lam = 0.0
            return self._top_up(f"at {self.steps / total:.0%} of the training (fine-tuned for the rest)")
        return {}

    def finalize(self) -> nn.Module:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None  # type: ignore[assignment]
        if self.target is not None:
            what, wanted, measure = self.target
            if measure(self.model) / self.base_measure > wanted * 1.02:
                self._top_up(
                    "after the training (not fine-tuned: train longer, or fine-tune with prune -m "
                    "l1-filter --ratio 0 --epochs N)"
                )
            got = measure(self.model) / self.base_measure
            self.records.append({"target": what, "wanted": round(wanted, 4), "reached": round(got, 4)})
            self.notes.append(target_note(what, wanted, got))
        self.layers = [{"name": cg.name, "channels_after": cg.size} for cg in self.lasso.groups]
        return self.model

    def _top_up(self, when: str) -> dict:
        """What the group lasso left above the target, removed by L1 ranking across layers."""
        what, wanted, measure = self.target
        now = measure(self.model)
        counts, _ = global_counts(
            self.model, self.shape, wanted * self.base_measure / now, measure, self.config.min_channels, self.select
        )
        changes = prune_filters(
            self.model, self.shape, {**counts, "_default": 0}, self.config.min_channels, self.select, skipped=self.notes
        )
        self.lasso.refresh(self.model)
        self.notes.append(
            f"the group lasso reached {now / self.base_measure:.3f} of the input's {what}; "
            f"{sum(counts.values())} more channels removed by L1 ranking {when}"
        )
        return changes
