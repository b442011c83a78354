"""A stored graph turned into a model: its cost checked first (on the meta device), then a module
that holds the file's tensors under their own names and interprets the graph (``graph.run``).

Before a stored graph computes anything real, ``check_cost`` runs it on the meta device (shapes only)
at the exact input shape that is about to run -- the batch of a latency run, a user's batch, an
evaluation's last short batch -- and totals what it asks for with each operator's own formula
(``graph_ops``): operations, and the peak of live memory (a view shares its base's bytes, an op that
may copy is charged as a copy, each value is freed after its last reader as ``run`` frees it, and a
kernel's scratch counts while it runs; with gradients on, nothing is freed: autograd keeps it). The
check itself is bounded before it builds anything: a node's results are counted from its arguments
before it runs. ``GraphModel.forward`` checks each new shape once (cached) and refuses, in one line, a
call that asks for more than ``limits`` allow -- except a batch whose justified cost passes only the per-call
cap (an evaluation batch of the user's own data), which runs in parts that fit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress import budget, kinds
from compress.budget import call_limits
from compress.counting import known_cost, mac_counter
from compress.distributed import device_of
from compress.errors import CompressError, InputError, UsageError, first_line, param, safe
from compress.graph.ops import nbytes
from compress.graph.program import DTYPES, MAX_RESULTS, Graph, GraphError, Ref, Tensor, dump, parse, run
from compress.quant_state import PARAMS, get_state

MAX_VALUES = 200_000  # tensors a graph may compute in one run, all its nodes' results together


@dataclass
class Cost:
    """What running a graph on ``batch`` samples asks for: operations (each op's formula: multiply-adds
    counted twice, windows and reductions included) and the peak of live memory, input included."""

    batch: int
    work: int
    peak_bytes: int
    tensors: int  # results the graph computes


def cost(g: Graph, tensors: list, batch: int = 1, dtype: torch.dtype | None = None, grad: bool = False) -> Cost:
    """Run ``g`` on the meta device (shapes only, nothing computed) for ``batch`` samples and total its
    cost; GraphError as soon as it computes more tensors than the check may hold."""
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors]
    x = torch.empty((batch, *g.input), dtype=dtype or DTYPES[g.dtype], device="meta")
    owners: dict[int, tuple] = {0: (0,)}  # value -> the allocations it keeps alive (itself, a view's base)
    size = {0: nbytes(x)}  # allocation -> bytes
    users = {0: 1}  # allocation -> live values keeping it
    st = {"live": size[0], "peak": size[0], "all": size[0], "work": x.numel(), "tensors": 1}

    def before(k, node, args, kwargs):
        n = node.op.results(args, kwargs) if node.op.results is not None else 1
        if n > MAX_RESULTS:
            raise GraphError(f"has a {node.op.name} node (node {k}) that returns more than {MAX_RESULTS:,} tensors")
        st["tensors"] += n
        if st["tensors"] > MAX_VALUES:
            raise GraphError(f"computes more than {MAX_VALUES:,} tensors")

    def watch(k, node, args, kwargs, out, values):
        i = k + 1
        alloc, work = node.op.charge(args, kwargs, out)
        st["work"] += work
        first = node.args[0] if node.args else None
        kept = nbytes(out) if alloc else 0
        if node.op.view:  # shares its base's memory: a stored tensor's (counted apart) or an earlier value's
            owners[i] = owners.get(first.index, ()) if isinstance(first, Ref) else ()
        elif node.op.returns == "int":
            owners[i] = ()
        else:  # a new allocation; an op that may copy (view as reshape) may also keep its base
            base = owners.get(first.index, ()) if isinstance(first, Ref) and node.op.name == "view" else ()
            owners[i], size[i], users[i] = (i, *base), kept, 0
            st["live"] += kept
            st["all"] += alloc
        for o in owners[i]:
            users[o] += 1
        st["peak"] = max(st["peak"], st["live"] + max(alloc - kept, 0))
        for j in g.frees[k]:
            for o in owners.pop(j, ()):
                users[o] -= 1
                if users[o] == 0:
                    st["live"] -= size[o]

    with torch.no_grad():
        run(g, x, meta, watch, before)
    if grad:  # autograd keeps what the forward computed for the backward, which does about twice its work
        return Cost(batch, 3 * st["work"], st["all"], st["tensors"])
    return Cost(batch, st["work"], st["peak"], st["tensors"])


def limits(tensors: list, g: Graph, batch: int = 1) -> tuple[float, float]:
    """(work, bytes) that one call of a graph on ``batch`` samples may ask for (``budget.limits``)."""
    return budget.limits(justified(tensors, g), batch)


def justified(tensors: list, g: Graph) -> tuple[int, int]:
    """(work, bytes) one sample of a graph may ask for, for what its weights and input are (``budget.justified``)."""
    inp = math.prod(g.input)
    return budget.justified(
        sum(t.numel() for t in tensors),
        sum(t.numel() * t.element_size() for t in tensors),
        inp,
        inp * DTYPES[g.dtype].itemsize,
    )


def check_cost(g: Graph, tensors: list, batch: int = 1, dtype: torch.dtype | None = None, grad: bool = False) -> Cost:
    """Refuse (GraphError) a call of ``g`` on ``batch`` samples that asks for more than ``limits``."""
    try:
        c = cost(g, tensors, batch, dtype, grad)
    except GraphError:
        raise
    except Exception as e:  # an op that does not fit its arguments' shapes, a size torch refuses
        raise GraphError(
            f"does not run on the input shape {(batch, *g.input)} ({type(e).__name__}: {safe(first_line(e, 100))})"
        ) from None
    max_work, max_bytes = limits(tensors, g, batch)
    if c.work > max_work or c.peak_bytes > max_bytes:
        raise GraphError(
            f"asks for {c.work:.3g} operations and {c.peak_bytes / 2**20:,.0f} MiB for a batch of {batch}; "
            f"its {sum(t.numel() for t in tensors):,} weights and input justify at most {max_work:.3g} "
            f"and {max_bytes / 2**20:,.0f} MiB (set COMPRESS_MAX_GRAPH_COST to a larger factor for a "
            "file you trust)"
        )
    return c


class GraphModel(nn.Module):
    """A model decoded from its stored graph: the file's tensors under their own names, and a forward
    that interprets the checked graph (``run``). It has no layers of its own: it runs, reports and
    encodes, and the methods that change layers ask for the user's ``--arch``."""

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
        self._checked: dict = {}  # (batch, dtype, grad) of the calls whose cost was checked -> samples a run

    def forward(self, x: torch.Tensor):
        g = self._graph
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != g.input or x.dim() != len(g.input) + 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"input of shape {shape} does not fit this model: its stored graph takes "
                f"(N, {', '.join(map(str, g.input))})"
            )
        tensors, chunk = self._check(x)
        if chunk >= x.shape[0]:
            return run(g, x, tensors)
        outs = [run(g, part, tensors) for part in x.split(chunk)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs, strict=False))
        return torch.cat(outs)

    def _check(self, x: torch.Tensor) -> tuple[list, int]:
        """The tensors a call on ``x`` reads, and the samples one run of it may take (``_chunk``, once a shape)."""
        tensors = [getattr(m, leaf) for m, leaf in self._slots]
        grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors))
        key = (x.shape[0], x.dtype, grad)
        chunk = self._checked.get(key)
        if chunk is None:
            chunk = self._chunk(tensors, x.shape[0], x.dtype, grad)
            if len(self._checked) >= 64:
                self._checked.clear()
            self._checked[key] = chunk
        return tensors, chunk

    def _chunk(self, tensors: list, batch: int, dtype: torch.dtype, grad: bool) -> int:
        """The samples one run may take of a batch of ``batch``: all of them when the batch's cost is within its
        limits; else, when it is the per-call cap that the batch's justified cost passes (a large evaluation
        batch of the user's own data), the largest half, quarter... of it whose cost is within them, run one
        after the other; InputError otherwise (a graph that costs more than its weights justify never runs)."""
        work, nbytes = justified(tensors, self._graph)
        max_work, max_bytes = call_limits()
        size, first = batch, None
        while True:
            try:
                check_cost(self._graph, tensors, size, dtype, grad)
                return size
            except GraphError as e:
                first = first or e
                if size == 1 or (size * work <= max_work and size * nbytes <= max_bytes):  # not the cap: refused
                    raise InputError(
                        f"this model's stored graph will not be run on a batch of {batch}: it {first}"
                    ) from None
            size = (size + 1) // 2

    def layer_table(self) -> list[dict[str, Any]]:
        """The report's rows of a model with no layers of its own (``metrics.layer_table``): one per group of
        the stored graph's nodes -- a node that multiplies (``MAC_OPS``) and the nodes after it up to the next
        (its batch norm, a residual add, an activation, a pooling) -- named by the module path of the first
        stored tensor it reads (``node k`` where it reads none). Each row: the group's op kinds (``type``, as
        "conv2d+batch_norm+relu"), the parameters it is the first to read and their nonzeros, its MACs of one
        sample (torch's FLOP counter, as ``count_macs``: the rows sum to the model's total), the shape of its
        last result, ``nodes`` (its first and last node) and ``bits`` where its weight is quantized. Names are
        the file's (module paths, checked by ``parse``): print them through ``printable``."""
        g = self._graph
        x = torch.zeros((1, *g.input), dtype=DTYPES[g.dtype], device=device_of(self))
        with torch.no_grad():
            tensors, _ = self._check(x)  # one sample, checked as any call is
        rows: list[dict[str, Any]] = []
        seen: set[int] = set()  # params counted in an earlier row
        counter, flops = mac_counter(), [0]

        def before(k, node, args, kwargs):
            flops[0] = counter.get_total_flops()

        def watch(k, node, args, kwargs, out, values):
            kind = _kind(node.op.name)
            read = _tensors(node)
            if node.op.name in MAC_OPS or (not rows and kind):
                first = g.tensors[read[0]] if read else None
                rows.append(
                    {
                        "name": first.rpartition(".")[0] if first else f"node {k}",
                        "type": "",
                        "params": 0,
                        "nonzeros": 0,
                        "macs": 0,
                        "output_shape": [],
                        "nodes": [k, k],
                    }
                )
                mod, leaf = self._slots[read[0]] if read else (None, "")
                if leaf in PARAMS:
                    q = get_state(mod, leaf)
                    if q is not None:
                        rows[-1]["bits"] = q.bits
            if not rows:  # the input's size, read before any layer
                return
            row = rows[-1]
            row["macs"] += (counter.get_total_flops() - flops[0]) // 2
            row["nodes"][1] = k
            if kind and kind not in row["type"].split("+"):
                row["type"] = f"{row['type']}+{kind}" if row["type"] else kind
            for j in read:
                if j < len(g.params) and j not in seen:
                    seen.add(j)
                    row["params"] += tensors[j].numel()
                    row["nonzeros"] += int(torch.count_nonzero(tensors[j]))
            if isinstance(out, torch.Tensor):
                row["output_shape"] = list(out.shape[1:])

        with torch.no_grad(), counter:
            run(g, x, tensors, watch, before)
        return rows

    def extra_repr(self) -> str:
        return f"graph of {len(self._graph.nodes)} nodes, input (N, {', '.join(map(str, self._graph.input))})"


MAC_OPS = frozenset({"conv2d", "linear", "scaled_dot_product_attention"})  # each starts a row of the layer table
_BOOKKEEPING = frozenset({"getitem", "sym_size.int", "sym_mul"})  # no op kind of their own in a row
_KINDS = {"_native_batch_norm_legit_no_training": "batch_norm"}


def _kind(op: str) -> str:
    """An op's kind as a row of the layer table names it: "add" for add.Tensor, "" for bookkeeping."""
    return "" if op in _BOOKKEEPING else _KINDS.get(op, op.partition(".")[0])


def _tensors(node) -> list[int]:
    """The stored tensors a node reads, in the order of its arguments (a list argument holds no lists)."""
    return [
        x.index
        for v in (*node.args, *node.kwargs.values())
        for x in (v if isinstance(v, list) else [v])
        if isinstance(x, Tensor)
    ]


def graph_only(what: str) -> UsageError:
    """The error for a model decoded from a .cpz's stored graph (ATen calls, no layers) given to something
    that needs the model's layers or code. It never names the --arch the file mentions: a path read from a
    file is not a suggestion to run it."""
    return UsageError(
        f"this model was decoded from its stored graph: it runs, reports and encodes, but compress "
        f"{what}; decode the .cpz it came from with {param('arch', 'module:callable')} (your own code that "
        "builds it) to change it"
    )


_REFUSED = {kinds.CHANGE: "changes models through their layers", kinds.ONNX: "exports ONNX from a model's layers"}


@kinds.refusal.register(GraphModel)
def _refusal(model: GraphModel, action: str) -> CompressError | None:
    if action == kinds.INT8:
        return InputError(
            "INT8 file: its float architecture was stored as a graph only; rebuilding the INT8 model "
            f"needs its layers: pass {param('arch', 'module:callable')} (your own code that builds it)"
        )
    return graph_only(_REFUSED[action]) if action in _REFUSED else None


@known_cost.register(GraphModel)
def _known_cost(model: GraphModel, input_shape) -> None:
    return None  # it checks the cost of each new shape itself (``forward``)


@functools.singledispatch
def stored(model: nn.Module) -> dict | None:
    """The graph data a module was decoded from (it has no layers of its own), or None."""
    return None


@stored.register(GraphModel)
def _stored(model: GraphModel) -> dict:
    return dump(model._graph)


def rebuild(doc: Any, tensors: dict[str, torch.Tensor]) -> GraphModel:
    """The stored graph as a runnable module, after ``parse`` and ``check_cost``; GraphError otherwise."""
    g = parse(doc)
    for fqn in g.tensors:
        if fqn not in tensors:
            raise GraphError(f"reads tensor {safe(fqn)}, which the file does not hold")
    ordered = [tensors[fqn] for fqn in g.tensors]
    check_cost(g, ordered)  # one sample, before anything else; each batch that runs is checked again
    model = GraphModel(g, tensors).eval()
    model._checked[(1, DTYPES[g.dtype], False)] = 1
    return model
