"""Coupled channel groups from torch-pruning's DependencyGraph, and the per-channel slices of
every layer in a group.

A *group* is every parameter slice tied to one set of channels: the producing conv's filters,
its BatchNorm, the next layers' input slices, and -- in residual nets -- every conv that writes
into the same stage (the identity path couples them). torch-pruning finds the coupling; this module
exposes each member's slices so that importance scores and penalties can be computed on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

PRUNABLE_ROOTS = (nn.Conv2d, nn.Linear)


@dataclass
class ChannelGroup:
    name: str                 # FQN of the root layer (the first producer of these channels)
    group: object             # torch_pruning Group with full indices
    size: int                 # number of channels

    @property
    def root(self) -> nn.Module:
        return self.group[0].dep.target.module


def example_input(model: nn.Module, input_shape) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(tuple(input_shape), dtype=p.dtype, device=p.device)


def output_layers(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The layer(s) that write the logits: the last Conv/Linear executed (never pruned)."""
    order = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m))
             for m in model.modules() if isinstance(m, PRUNABLE_ROOTS)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:] if order else []


def build(model: nn.Module, input_shape) -> tuple[tp.DependencyGraph, list[nn.Module]]:
    x = example_input(model, input_shape)
    try:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    except Exception as e:  # torch-pruning's tracer fails on some graphs (e.g. channel shuffle's reshape)
        from ..errors import InputError

        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise InputError(f"structural pruning cannot follow this model's channels: torch-pruning failed tracing "
                         f"it ({type(e).__name__}{': ' + msg if msg else ''}); threshold pruning and quantization "
                         "still apply") from e
    return dg, output_layers(model, x)


def unselected(model: nn.Module, select) -> list[nn.Module]:
    """The convs a ``Select`` leaves out: their output channels are kept."""
    chosen = {m for _, m in select.layers(model, kinds=(nn.Conv2d,))}
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in chosen]


def channel_groups(model: nn.Module, input_shape, roots=PRUNABLE_ROOTS, ignored=()):
    """(dependency graph, [ChannelGroup]) for every prunable set of coupled channels."""
    dg, outs = build(model, input_shape)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in dg.get_all_groups(ignored_layers=list(outs) + list(ignored), root_module_types=roots):
        root = g[0].dep.target.module
        groups.append(ChannelGroup(names.get(root, str(root)), g, len(g[0].idxs)))
    return dg, groups


def _normalised_filters(group):
    """Predicate on (pruning fn, layer): a bias-free producer whose output a BatchNorm in the same
    group normalises. Its filters' size does not change the function, so penalties and the
    proximal step leave them alone and the union test ignores them."""
    has_bn = any(dep.pruning_fn == tpf.prune_batchnorm_out_channels for dep, _ in group)
    return lambda fn, layer: (has_bn and fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels)
                              and layer.bias is None)


def slices(group) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """For each member of the group: (kind, root_idxs, slice matrix (channels, k)).

    Rows are per channel of that member; ``root_idxs`` map rows to the root's channels. Slices keep
    the autograd graph (a penalty can be differentiated through them). Kinds: "out" (producer
    filters), "out_bn" (producer filters normalised by a BatchNorm after them), "in" (consumer
    input slices), "bn" (BatchNorm scale and shift).
    """
    out = []
    normalised = _normalised_filters(group)
    for i, (dep, idxs) in enumerate(group):
        layer, fn = dep.layer, dep.pruning_fn
        root_idxs = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
        idxs_t = torch.as_tensor(idxs, dtype=torch.long)
        if fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels):
            w = layer.weight.flatten(1)
            if layer.bias is not None:
                w = torch.cat([w, layer.bias[:, None]], 1)
            kind = "out_bn" if normalised(fn, layer) else "out"
            out.append((kind, root_idxs, w[idxs_t]))
        elif fn in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels):
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                continue  # depthwise: its filters are counted as the group's "out" member
            w = layer.weight.transpose(0, 1).flatten(1)
            out.append(("in", root_idxs, w[idxs_t]))
        elif fn == tpf.prune_batchnorm_out_channels and layer.affine:
            out.append(("bn", root_idxs, torch.stack([layer.weight, layer.bias], 1)[idxs_t]))
    return out


def group_norms(group, size: int, kinds=("out", "in", "bn")) -> torch.Tensor:
    """L2 norm of every channel over all coupled slices: (size,)."""
    sq = None
    for kind, ridx, w in slices(group):
        if kind not in kinds:
            continue
        s = torch.zeros(size, dtype=w.dtype, device=w.device).index_add(0, ridx, w.pow(2).sum(1))
        sq = s if sq is None else sq + s
    if sq is None:
        return torch.zeros(size)
    return sq


def conv_groups(cg: ChannelGroup, names: dict) -> tuple[int, str | None]:
    """(G, None): the channels of this group must be removed evenly from G equal blocks (G = 1: no
    grouped convolution in it; depthwise convs follow any choice). (0, why): they cannot be.

    A grouped convolution (1 < groups, not depthwise) keeps ``groups`` blocks of channels; removing
    the same positions from every block keeps it valid, as torch-pruning's own pruner does.
    Removed anywhere, torch-pruning fails half-way and leaves a broken model."""
    g, first = 1, None
    for dep, _ in cg.group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            first = first or f"{names.get(m, type(m).__name__)}: grouped conv (groups={m.groups})"
            if max(g, m.groups) % min(g, m.groups):
                return 0, f"{first} and another with groups={m.groups}"
            g = max(g, m.groups)
    if g > 1 and cg.size % g:
        return 0, f"{first}: {cg.size} channels do not split into {g} groups"
    return g, None


def refresh(dg, cg: ChannelGroup) -> ChannelGroup:
    """``cg`` as the graph sees it now. Groups are collected before any is pruned; once others are,
    a concatenation's consumers hold fewer channels and the old indices point past them."""
    root = cg.root
    size = root.out_channels if isinstance(root, nn.modules.conv._ConvNd) else root.out_features
    dep = cg.group[0].dep
    return ChannelGroup(cg.name, dg.get_pruning_group(root, dep.handler, list(range(size))), size)


def prune_group(dg, cg: ChannelGroup, idxs) -> None:
    """Physically remove channels ``idxs`` (root indexing) from every coupled layer."""
    idxs = sorted(int(i) for i in idxs)
    if not idxs:
        return
    dep = cg.group[0].dep
    pg = dg.get_pruning_group(dep.target.module, dep.handler, idxs)
    pg.prune()


def member_norms(group, size: int, kinds=("out", "in", "bn")) -> list[torch.Tensor]:
    """Per member of the group, the L2 norm of its slice for each root channel: [(size,)]."""
    out = []
    with torch.no_grad():
        for kind, ridx, w in slices(group):
            if kind not in kinds:
                continue
            out.append(torch.zeros(size, dtype=w.dtype).index_add(0, ridx, w.pow(2).sum(1)).sqrt())
    return out


@torch.no_grad()
def scale_channels(group, scale: torch.Tensor) -> None:
    """Multiply every coupled slice of root channel c by scale[c], in place (scale-invariant
    filters before a BatchNorm are left alone, as in ``slices``)."""
    normalised = _normalised_filters(group)
    for i, (dep, idxs) in enumerate(group):
        layer, fn = dep.layer, dep.pruning_fn
        if normalised(fn, layer):
            continue
        ridx = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
        idx = torch.as_tensor(idxs, dtype=torch.long)
        s = scale[ridx].to(layer.weight.dtype) if hasattr(layer, "weight") and layer.weight is not None else None
        if s is None:
            continue
        if fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels):
            shape = (-1,) + (1,) * (layer.weight.dim() - 1)
            layer.weight[idx] *= s.view(shape)
            if layer.bias is not None:
                layer.bias[idx] *= s
        elif fn in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels):
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                continue
            shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
            layer.weight[:, idx] *= s.view(shape)
        elif fn == tpf.prune_batchnorm_out_channels and layer.affine:
            layer.weight[idx] *= s
            layer.bias[idx] *= s
