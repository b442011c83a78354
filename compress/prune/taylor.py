"""First-order Taylor importance (Molchanov et al., "Importance Estimation for Neural Network Pruning",
CVPR 2019): a channel's score is the loss change its removal would cause, to first order,
|sum of w * dL/dw| over the parameters that produce it -- its BatchNorm's scale and shift where it has
one (Molchanov's best variant, "Taylor-FO-BN": zeroing them zeroes the channel), else its filter and
bias. In a residual stage the coupled producers' terms add up, as the channel is removed from all.

Unlike the weight norms this needs data: ``prepare`` runs the task loss (or the user's ``train_step``)
on ``SAMPLES`` training samples with the model in eval mode (BatchNorm statistics untouched) and keeps
w * grad on each layer until ``release``; the scores then rank the channels of the model and of the
copies a target's search prunes. ``--importance taylor`` / ``L1FilterConfig(importance="taylor")``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from compress.data import batches
from compress.errors import UsageError
from compress.method import needs_data
from compress.prune.graph import slices
from compress.prune.importance import register_importance

ATTR = "compress_taylor"  # on a layer between prepare and release: {parameter name: w * grad}
SAMPLES = 512


@register_importance("taylor")
class TaylorImportance:
    def prepare(self, model: nn.Module, ctx) -> None:
        if ctx.train is None:
            raise needs_data("importance 'taylor' scores channels by the loss gradient")
        device = next(model.parameters()).device
        was_training, grads = model.training, {n: p.requires_grad for n, p in model.named_parameters()}
        model.eval()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)
        order = (
            torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(0))[:SAMPLES]
            if not ctx.train.iterable
            else None
        )
        seen = 0
        try:
            for x, y in batches(ctx.train, 64, order):
                x, y = x.to(device), y.to(device)
                loss = ctx.train_step(model, x, y) if ctx.train_step is not None else ctx.loss(model(x), y)
                (loss * len(x)).backward()  # summed over samples
                seen += len(x)
                if seen >= SAMPLES:
                    break
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    sal = {
                        pn: (p * p.grad).detach().cpu()
                        for pn, p in m.named_parameters(recurse=False)
                        if p.grad is not None
                    }
                    if sal:
                        setattr(m, ATTR, sal)
        finally:
            model.zero_grad(set_to_none=True)
            for n, p in model.named_parameters():
                p.requires_grad_(grads[n])
            model.train(was_training)

    def release(self, model: nn.Module) -> None:
        for m in model.modules():
            if ATTR in m.__dict__:
                delattr(m, ATTR)

    def __call__(self, group, size: int | None = None) -> torch.Tensor:
        size = size or len(group[0].idxs)
        sal = {}
        for dep, _ in group:
            for pn, t in getattr(dep.layer, ATTR, {}).items():
                sal[id(getattr(dep.layer, pn))] = t
        if not sal:
            raise UsageError("importance 'taylor' was asked for scores before its prepare() ran")

        def of(p):
            t = sal.get(id(p))
            return torch.zeros(p.shape) if t is None else t

        score = torch.zeros(size, dtype=torch.float64)
        for kind, ridx, w in slices(group, of):
            if kind in ("out", "bn"):  # the parameters whose zeroing removes the channel's output
                score.index_add_(0, ridx, w.double().sum(1))
        return score.abs().float()
