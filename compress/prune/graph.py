"""Coupled channel groups from torch-pruning's DependencyGraph, and the per-channel slices of
every layer in a group.

A *group* is every parameter slice tied to one set of channels: the producing conv's filters,
its BatchNorm, the next layers' input slices, and -- in residual nets -- every conv that writes
into the same stage (the identity path couples them). torch-pruning finds the coupling; this module
exposes each member's slices so that importance scores and penalties can be computed on them.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.pruner import function as tpf

from compress.errors import InputError, first_line

PRUNABLE_ROOTS = (nn.Conv2d, nn.Linear)


@dataclass
class ChannelGroup:
    name: str  # FQN of the root layer (the first producer of these channels)
    group: Any  # torch_pruning Group with full indices
    size: int  # number of channels
    blocked: str | None = None  # why these channels cannot be removed safely (None: they can)

    @property
    def root(self) -> nn.Module:
        return self.group[0].dep.target.module


def example_input(model: nn.Module, input_shape) -> torch.Tensor:
    p = next(model.parameters())
    return torch.zeros(tuple(input_shape), dtype=p.dtype, device=p.device)


def output_layers(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The layer(s) that write the logits: the last Conv/Linear executed (never pruned)."""
    order = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(m))
        for m in model.modules()
        if isinstance(m, PRUNABLE_ROOTS)
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:] if order else []


_RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten)


class _ChannelSplits(TorchFunctionMode):
    """Records the autograd nodes of reshapes that split the channel axis into several axes, as a
    channel shuffle does ((N, C, H, W) -> (N, g, C/g, H, W), then a transpose). torch-pruning maps
    channel indices straight through such a reshape and the transpose after it, which is wrong: the
    shuffle permutes channels. Flattens and token reshapes keep axis 1 and are not recorded."""

    def __init__(self):
        super().__init__()
        self.grad_fns = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            x = args[0] if args else None
            if (
                isinstance(x, torch.Tensor)
                and x.dim() >= 3
                and out.dim() > x.dim()
                and out.shape[0] == x.shape[0]
                and out.shape[1] != x.shape[1]
            ):
                self.grad_fns.add(out.grad_fn)
        return out


@contextlib.contextmanager
def _guarded(dg):
    """torch-pruning 1.6 divides by zero mapping indices through some reshapes (a channel shuffle's
    second view); such a reshape is recorded as unmapped instead, and its groups are not pruned."""
    original = tp_index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        try:
            original(graph, node)
        except ArithmeticError:
            dg.compress_unmapped.add(node.module)

    tp_index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        tp_index_mapping.update_reshape_index_mapping = original


def build(model: nn.Module, input_shape) -> tuple[tp.DependencyGraph, list[nn.Module]]:
    x = example_input(model, input_shape)
    dg = tp.DependencyGraph()
    dg.compress_unmapped, splits = set(), _ChannelSplits()
    try:
        with _guarded(dg), splits, warnings.catch_warnings():
            # bare Parameters (ConvNeXt's layer scale) are pruned along their channel axis, as wanted
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            dg.build_dependency(model, example_inputs=x)
    except Exception as e:  # torch-pruning's tracer fails on some graphs
        raise InputError(
            f"structural pruning cannot follow this model's channels: torch-pruning failed tracing "
            f"it ({type(e).__name__}: {first_line(e)}); threshold pruning and quantization "
            "still apply"
        ) from e
    dg.compress_splits = splits.grad_fns
    _map_concat_before_flatten(dg)
    for node in dg.module2node.values():
        if node.grad_fn in dg.compress_splits:
            # groups that reach a channel split are kept whole (``blocked``): stop them there, instead
            # of letting torch-pruning map indices through the shuffle (slow, and wrong)
            node.dependencies = []
    return dg, output_layers(model, x)


def _reaches_reshape(node, depth: int = 0) -> bool:
    """The node's output reaches a reshape (flatten) through element-wise ops only."""
    if depth > 16:
        return False
    for out in node.outputs:
        if out.type == tp_ops.OPTYPE.RESHAPE or (
            out.type == tp_ops.OPTYPE.ELEMENTWISE and _reaches_reshape(out, depth + 1)
        ):
            return True
    return False


def _map_concat_before_flatten(dg) -> None:
    """torch-pruning 1.6 leaves a channel concatenation unmapped when a flatten follows it: it compares the
    concat's channels with the next Linear's inputs (C x H x W), decides the concat was on another dimension
    and maps no offsets, so removing one input's channels removed the same positions of every input's and
    the wrong Linear columns. Here the concat is mapped as any channel concat (offsets from its inputs'
    channels); torch-pruning's own flatten mapping then moves the Linear's columns in blocks of H x W."""
    from torch_pruning.dependency import shape_infer

    for node in dg.module2node.values():
        if node.type != tp_ops.OPTYPE.CONCAT or node.module.offsets is not None:
            continue
        if getattr(node.grad_fn, "_saved_dim", None) != 1 or not _reaches_reshape(node):
            continue
        chs = [shape_infer.infer_channels_between(dg, n, node) for n in node.inputs]
        if any(c is None for c in chs):
            continue
        out = shape_infer.infer_in_channels_recursively(dg, node, recursive_depth=[0])
        if out is None or out % sum(chs):
            continue
        original = shape_infer.infer_in_channels_recursively
        shape_infer.infer_in_channels_recursively = lambda graph, n, recursive_depth: None  # skip that comparison
        try:
            tp_index_mapping.update_concat_index_mapping(dg, node)
        finally:
            shape_infer.infer_in_channels_recursively = original


def blocked(dg, group) -> str | None:
    """Why the channels of ``group`` cannot be removed safely, or None."""
    for dep, _ in group:
        node = dep.target
        if node.grad_fn in dg.compress_splits or node.module in dg.compress_unmapped:
            return "they pass through a channel shuffle (a reshape that splits the channels into groups)"
    return None


def unselected(model: nn.Module, select) -> list[nn.Module]:
    """The convs a ``Select`` leaves out: their output channels are kept."""
    chosen = {m for _, m in select.layers(model, kinds=(nn.Conv2d,))}
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m not in chosen]


def channel_groups(model: nn.Module, input_shape, roots=PRUNABLE_ROOTS, ignored=()):
    """(dependency graph, [ChannelGroup]) for every set of coupled channels rooted at a ``roots``
    layer. Groups that cannot be pruned safely carry the reason in ``blocked`` (their ``group`` is
    None when torch-pruning could not follow them at all).

    The loop is torch-pruning's ``get_all_groups`` (roots in graph order; a layer already in a group
    roots none), one root at a time so that a group it cannot follow does not stop the others."""
    dg, outs = build(model, input_shape)
    names = {m: n for n, m in model.named_modules()}
    ignored = set(outs) | set(ignored) | set(dg.IGNORED_LAYERS_IN_TRACING)
    groups, visited = [], set()
    for m in list(dg.module2node):
        if m in ignored or m in visited or not isinstance(m, tuple(roots)):
            continue
        pruner = dg.get_pruner_of_module(m)
        size = pruner.get_out_channels(m) if pruner is not None else None
        if size is None:
            continue
        cg = _group(dg, names.get(m, str(m)), cast(nn.Module, m), pruner.prune_out_channels, int(size))
        if cg.group is None:
            visited.add(m)
            groups.append(cg)
            continue
        members = [dep.target.module for dep, _ in cg.group if dg.is_out_channel_pruning_fn(dep.handler)]
        visited.update(members)
        if not ignored.intersection(members):
            groups.append(cg)
    return dg, groups


def _group(dg, name: str, root: nn.Module, handler, size: int) -> ChannelGroup:
    """All ``size`` channels of ``root`` and everything coupled to them; ``blocked`` says why they
    cannot be removed (with no group when torch-pruning cannot follow them at all)."""
    try:
        with _guarded(dg):
            group = dg.get_pruning_group(root, handler, list(range(size)))
    except Exception as e:
        return ChannelGroup(name, None, size, f"torch-pruning cannot follow them ({first_line(e)})")
    return ChannelGroup(name, group, size, blocked(dg, group))


def normalised_filters(group):
    """Predicate on (pruning fn, layer): a bias-free producer whose output a BatchNorm in the same
    group normalises. Its filters' size does not change the function, so penalties and the
    proximal step leave them alone and the union test ignores them."""
    has_bn = any(dep.pruning_fn == tpf.prune_batchnorm_out_channels for dep, _ in group)
    return lambda fn, layer: (
        has_bn and fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels) and layer.bias is None
    )


def slices(group, of=None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """For each member of the group: (kind, root_idxs, slice matrix (channels, k)) of its parameters, or of
    ``of(parameter)`` (e.g. ``lambda p: p * p.grad``) where given.

    Rows are per channel of that member; ``root_idxs`` map rows to the root's channels. Slices keep
    the autograd graph (a penalty can be differentiated through them). Kinds: "out" (producer
    filters), "out_bn" (producer filters normalised by a BatchNorm after them), "in" (consumer
    input slices), "bn" (BatchNorm scale and shift).
    """
    out = []
    of = of or (lambda p: p)
    normalised = normalised_filters(group)
    for i, (dep, idxs) in enumerate(group):
        layer, fn = dep.layer, dep.pruning_fn
        root_idxs = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
        idxs_t = torch.as_tensor(idxs, dtype=torch.long)
        if fn in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels):
            w = of(layer.weight).flatten(1)
            if layer.bias is not None:
                w = torch.cat([w, of(layer.bias)[:, None]], 1)
            kind = "out_bn" if normalised(fn, layer) else "out"
            out.append((kind, root_idxs, w[idxs_t]))
        elif fn in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels):
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                continue  # depthwise: its filters are counted as the group's "out" member
            w = of(layer.weight).transpose(0, 1).flatten(1)
            out.append(("in", root_idxs, w[idxs_t]))
        elif fn == tpf.prune_batchnorm_out_channels and layer.affine:
            out.append(("bn", root_idxs, torch.stack([of(layer.weight), of(layer.bias)], 1)[idxs_t]))
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
    grouped convolution or attention in it; depthwise convs follow any choice). (0, why): they cannot be.

    A grouped convolution (1 < groups, not depthwise) keeps ``groups`` blocks of channels; removing
    the same positions from every block keeps it valid, as torch-pruning's own pruner does.
    Removed anywhere, torch-pruning fails half-way and leaves a broken model. MultiheadAttention's
    embedding splits into ``num_heads`` equal blocks the same way: each head loses the same dims."""
    g, first = 1, None
    for dep, _ in cg.group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            blocks, what = m.groups, f"grouped conv (groups={m.groups})"
        elif isinstance(m, nn.MultiheadAttention) and m.num_heads > 1:  # each head keeps the same width
            blocks, what = m.num_heads, f"attention ({m.num_heads} heads)"
        else:
            continue
        first = first or f"{names.get(m, type(m).__name__)}: {what}"
        if max(g, blocks) % min(g, blocks):
            return 0, f"{first} and another with {blocks} blocks"
        g = max(g, blocks)
    if g > 1 and cg.size % g:
        return 0, f"{first}: {cg.size} channels do not split into {g} groups"
    return g, None


def refresh(dg, cg: ChannelGroup) -> ChannelGroup:
    """``cg`` as the graph sees it now. Groups are collected before any is pruned; once others are,
    a concatenation's consumers hold fewer channels and the old indices point past them."""
    root: Any = cg.root
    size = root.out_channels if isinstance(root, nn.modules.conv._ConvNd) else root.out_features
    return _group(dg, cg.name, root, cg.group[0].dep.handler, int(size))


def _state(obj) -> dict:
    """A module's attributes, its dicts and lists copied one level (``.copy()`` for the plain and ordered
    kinds, which keeps their type and is ~10x cheaper than ``copy.copy``)."""
    plain = (dict, list, OrderedDict)
    return {
        k: (v.copy() if type(v) in plain else copy.copy(v)) if isinstance(v, (dict, list)) else v
        for k, v in vars(obj).items()
    }


def prune_group(dg, cg: ChannelGroup, idxs, model: nn.Module, input_shape) -> str | None:
    """Physically remove channels ``idxs`` (root indexing) from every coupled layer. If that fails,
    or a group through a reshape leaves a model that no longer runs (a reshape torch-pruning maps
    wrongly), every layer is put back as it was and the reason is returned; None when the channels
    were removed."""
    idxs = sorted(int(i) for i in idxs)
    if not idxs:
        return None
    objs = list(model.modules()) + [dep.target.module for dep, _ in cg.group]
    saved = [(o, _state(o)) for o in dict.fromkeys(o for o in objs if isinstance(o, nn.Module))]
    training = model.training
    dep = cg.group[0].dep
    try:
        with _guarded(dg):
            pg = dg.get_pruning_group(dep.target.module, dep.handler, idxs)
        pg.prune()
        if any(d.target.type == tp_ops.OPTYPE.RESHAPE for d, _ in pg):
            with torch.no_grad():
                model.eval()(example_input(model, input_shape))
            model.train(training)
    except Exception as e:
        for o, state in saved:
            vars(o).clear()
            vars(o).update(state)
        return f"removing them breaks the model ({first_line(e)})"
    return None


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
    normalised = normalised_filters(group)
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
