"""A stored graph turned into a model: its cost checked first (on the meta device), then a module
that holds the file's tensors under their own names and interprets the graph (``graph.run``).

Before a stored graph computes anything real, ``check_cost`` runs it on the meta device (shapes only)
for one sample and for two, and totals what it asks for: operations (multiply-adds counted twice by
torch's FLOP counter, plus every element each node reads and writes) and the peak of live activation
memory (views share their base's bytes; each value is freed after its last reader, as ``run`` does).
It is refused when either exceeds what its weights and input justify (``limits``), or when any value
grows faster than the batch (a graph's cost must be linear in it).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import first_line, safe
from .graph import DTYPES, Graph, GraphError, Ref, Tensor, dump, parse, run


def _numel(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel()
    if isinstance(v, (list, tuple)):
        return sum(_numel(x) for x in v)
    return 0


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


@dataclass
class Cost:
    """What running a graph on ``batch`` samples asks for: operations (multiply-adds counted twice,
    plus every element each node reads and writes) and the peak of live activation memory."""
    batch: int
    work: int
    peak_bytes: int
    numels: list  # of every tensor the graph computes, in order


def cost(g: Graph, tensors: list, batch: int = 1) -> Cost:
    """Run ``g`` on the meta device (shapes only, nothing computed) and total its cost."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
    x = torch.empty((batch, *g.input), dtype=DTYPES[g.dtype], device="meta")
    owner = {0: 0}              # value -> the value whose memory it uses (itself, or a view's base)
    size = {0: _nbytes(x)}      # owner -> bytes
    users = {0: 1}              # owner -> live values using it
    live = [size[0]]
    peak = [live[0]]
    numels: list = [x.numel()]
    work = [x.numel()]

    def watch(k, node, args, out, values):
        i = k + 1
        numels.extend(_numel(t) for t in (out if isinstance(out, (list, tuple)) else [out]))
        work[0] += _numel(out) + sum(_numel(a) for a in args if isinstance(a, (torch.Tensor, list)))
        first = node.args[0] if node.args else None
        b = owner.get(first.index) if isinstance(first, Ref) and node.op.view else None
        if b is None and isinstance(first, Tensor) and node.op.view:
            owner[i] = None  # a view of a stored tensor: the weights are counted apart
        elif b is None:
            owner[i], size[i], users[i] = i, _nbytes(out), 0
            live[0] += size[i]
        else:
            owner[i] = b
        if owner[i] is not None:
            users[owner[i]] += 1
        peak[0] = max(peak[0], live[0])
        for j in g.frees[k]:
            o = owner.get(j)
            if o is not None:
                users[o] -= 1
                if users[o] == 0:
                    live[0] -= size[o]

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        run(g, x, meta, watch)
    return Cost(batch, work[0] + fc.get_total_flops(), peak[0], numels)


def limits(tensors: list, g: Graph) -> tuple[float, float]:
    """(work, bytes) that one sample of a graph may ask for: a floor, or what its weights and input
    justify (a CNN does a few thousand operations per weight, holds a few copies of its activations);
    ``COMPRESS_MAX_GRAPH_COST`` multiplies both, for a file you trust."""
    factor = float(os.environ.get("COMPRESS_MAX_GRAPH_COST", 1))
    weights = sum(t.numel() for t in tensors)
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    inp = math.prod(g.input)
    return (factor * max(1 << 34, 4096 * (weights + inp)),
            factor * max(1 << 28, 16 * (weight_bytes + 4 * inp)))


def check_cost(g: Graph, tensors: list) -> Cost:
    """Refuse a graph whose cost per sample exceeds ``limits`` or grows faster than the batch."""
    try:
        one, two = cost(g, tensors, 1), cost(g, tensors, 2)
    except Exception as e:  # an op that does not fit its arguments' shapes, a size torch refuses
        raise GraphError(f"does not run on its own input shape {tuple(g.input)} ({type(e).__name__}: "
                         f"{safe(first_line(e, 100))})") from None
    if len(one.numels) != len(two.numels):  # split(x, 1, dim=0): a result per sample
        raise GraphError(f"computes {len(one.numels):,} tensors for one sample and {len(two.numels):,} for two "
                         "(a graph's cost must be linear in the batch)")
    for a, b in zip(one.numels, two.numels, strict=True):
        if b not in (a, 2 * a):
            raise GraphError(f"a value grows from {a:,} to {b:,} elements when the batch doubles (a graph's "
                             "cost must be linear in the batch)")
    max_work, max_bytes = limits(tensors, g)
    if one.work > max_work or one.peak_bytes > max_bytes:
        raise GraphError(f"asks for {one.work:.3g} operations and {one.peak_bytes / 2**20:,.0f} MiB of activations "
                         f"per sample; its {sum(t.numel() for t in tensors):,} weights and input justify at most "
                         f"{max_work:.3g} and {max_bytes / 2**20:,.0f} MiB (set COMPRESS_MAX_GRAPH_COST to a larger "
                         "factor for a file you trust)")
    return one


class GraphModel(nn.Module):
    """A model decoded from its stored graph: the file's tensors under their own names, and a forward
    that interprets the checked graph (``run``). It has no layers of its own: it runs, reports and
    encodes, and the methods that change layers ask for the user's ``--arch``."""

    layerless = True  # what stages and export check (``stages.is_layerless``), without importing coding

    def __init__(self, g: Graph, tensors: dict[str, torch.Tensor]):
        super().__init__()
        slots = []
        for k, fqn in enumerate(g.tensors):
            *path, leaf = fqn.split(".")
            mod: Any = self
            try:
                for p in path:
                    if p not in mod._modules:
                        mod.add_module(p, nn.Module())
                    mod = mod._modules[p]
                t = tensors[fqn]
                if k < len(g.params):
                    mod.register_parameter(leaf, nn.Parameter(t, requires_grad=t.is_floating_point()))
                else:
                    mod.register_buffer(leaf, t)
            except (KeyError, TypeError, AttributeError) as e:
                raise GraphError(f"cannot hold tensor {safe(fqn)} ({safe(first_line(e, 80))})") from None
            slots.append((mod, leaf))
        self._graph, self._slots = g, slots

    def forward(self, x: torch.Tensor):
        g = self._graph
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != g.input or x.dim() != len(g.input) + 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"input of shape {shape} does not fit this model: its stored graph takes "
                             f"(N, {', '.join(map(str, g.input))})")
        return run(g, x, [getattr(m, leaf) for m, leaf in self._slots])

    def extra_repr(self) -> str:
        return f"graph of {len(self._graph.nodes)} nodes, input (N, {', '.join(map(str, self._graph.input))})"


def stored(model: nn.Module) -> dict | None:
    """The graph data a module was decoded from (it has no layers of its own), or None."""
    return dump(model._graph) if isinstance(model, GraphModel) else None


def rebuild(doc: Any, tensors: dict[str, torch.Tensor]) -> GraphModel:
    """The stored graph as a runnable module, after ``parse`` and ``check_cost``; GraphError otherwise."""
    g = parse(doc)
    for fqn in g.tensors:
        if fqn not in tensors:
            raise GraphError(f"reads tensor {safe(fqn)}, which the file does not hold")
    ordered = [tensors[fqn] for fqn in g.tensors]
    check_cost(g, ordered)
    return GraphModel(g, tensors).eval()
