"""Whole-tensor views of a channel group, for work done at every training step or every reconfiguration:
``group_slices`` (the parameters ``graph.group_norms`` reads and ``graph.scale_channels`` scales, as slices of
whole tensors), their norms and scaling, and ``channel_costs`` (what removing each channel saves)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch_pruning.pruner import function as tpf

from compress.prune.graph import ChannelGroup, normalised_filters

_OUT = (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
_IN = (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels)


def member_kind(fn, layer: nn.Module) -> str | None:
    """Which part of a group member's weights holds its channels: "out" (a producer's filters and bias), "in"
    (a consumer's input slices; None for a depthwise conv, whose filters count as its "out"), "bn" (an affine
    BatchNorm's scale and shift); None for members with no such weights."""
    if fn in _OUT:
        return "out"
    if fn in _IN:
        return None if isinstance(layer, nn.Conv2d) and layer.groups > 1 else "in"
    if fn == tpf.prune_batchnorm_out_channels and getattr(layer, "affine", False):
        return "bn"
    return None


@dataclass
class Slice:
    """One parameter's share of a channel group: the rows (along ``dim``) that belong to root channels
    ``roots``; ``rows``/``roots`` None where they are all of them, in order (no indexing needed)."""

    module: nn.Module
    attr: str
    dim: int
    rows: torch.Tensor | None
    roots: torch.Tensor | None


def group_slices(group, size: int) -> list[Slice]:
    """The parameters that ``group_norms`` reads and ``scale_channels`` scales (kinds "out", "in", "bn"), as
    ``Slice``s, so that a proximal step can work on whole tensors: the same members, rows and channels."""
    normalised = normalised_filters(group)
    out = []
    for i, (dep, idxs) in enumerate(group):
        layer, fn = dep.layer, dep.pruning_fn
        if getattr(layer, "weight", None) is None or normalised(fn, layer):
            continue
        kind = member_kind(fn, layer)
        if kind is None:
            continue
        dim, attrs = (1, ("weight",)) if kind == "in" else (0, ("weight", "bias"))
        rows = torch.as_tensor(idxs, dtype=torch.long)
        roots = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
        n = layer.weight.shape[dim]
        whole = len(rows) == n == size and bool((rows == torch.arange(n)).all() and (roots == rows).all())
        for attr in attrs:
            if getattr(layer, attr, None) is not None:
                out.append(Slice(layer, attr, dim, None if whole else rows, None if whole else roots))
    return out


def slices_sq_norms(parts: list[Slice], size: int) -> torch.Tensor:
    """Squared L2 norm of every root channel over ``parts`` (as ``group_norms``): (size,)."""
    sq = None
    for s in parts:
        p = getattr(s.module, s.attr).detach()
        r = p.pow(2)
        if p.dim() > 1:
            r = r.sum([d for d in range(p.dim()) if d != s.dim])
        if s.rows is not None and s.roots is not None:
            r = torch.zeros(size, dtype=r.dtype, device=r.device).index_add(0, s.roots.to(r.device), r[s.rows])
        sq = r if sq is None else sq + r
    return sq if sq is not None else torch.zeros(size)


@torch.no_grad()
def scale_slices(parts: list[Slice], scale: torch.Tensor) -> None:
    """Multiply every slice of root channel c by scale[c], in place (as ``scale_channels``)."""
    for s in parts:
        p = getattr(s.module, s.attr)
        f = scale.to(p.dtype) if s.roots is None else scale[s.roots].to(p.dtype)
        shape = [1] * p.dim()
        shape[s.dim] = -1
        if s.rows is None:
            p.mul_(f.view(shape))
        elif s.dim == 0:
            p[s.rows] *= f.view(shape)
        else:
            p[:, s.rows] *= f.view(shape)


def channel_costs(model: nn.Module, groups: list[ChannelGroup], shape, what: str) -> list[torch.Tensor]:
    """Per group, the MACs (of one sample) or parameters that removing each root channel saves, counted
    layer by layer from the weights' shapes (and, for MACs, each layer's output positions). Removing a
    conv's input and output channels together saves a little less than the sum (an estimate from above)."""
    positions: dict[nn.Module, int] = {}

    def hook(m, inp, out):
        positions[m] = out[0, 0].numel() if isinstance(m, nn.Conv2d) else out.numel() // out.shape[-1]

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(hook) for m in layers]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(shape, device=next(iter(model.parameters())).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out = []
    for cg in groups:
        cost = torch.zeros(cg.size, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(cg.group):
            layer, fn = dep.layer, dep.pruning_fn
            w = getattr(layer, "weight", None)
            if w is None:
                continue
            kind = member_kind(fn, layer)
            if kind is None:
                continue
            if kind == "bn":
                if what != "MACs":
                    cost.index_add_(
                        0, torch.as_tensor(cg.group[i].root_idxs), torch.full((len(idxs),), 2.0, dtype=cost.dtype)
                    )
                continue
            dim = 1 if kind == "in" else 0
            per_row = w.numel() / w.shape[dim]
            if what == "MACs":
                per_row *= positions.get(layer, 0)
            elif dim == 0 and getattr(layer, "bias", None) is not None:
                per_row += 1
            cost.index_add_(
                0, torch.as_tensor(cg.group[i].root_idxs), torch.full((len(idxs),), per_row, dtype=cost.dtype)
            )
        out.append(cost)
    return out
