"""A model's computation as compress's own graph data: captured with ``torch.export``, stored as a
list of operator calls, decoded into typed objects and run by compress's interpreter.

A .cpz stores the structure of a model of the user's own classes as *references* to their code
(``arch.py``); decoding it needs their ``--arch``. When the model exports, the file also holds its
graph, so it can be decoded and run where the user's code is not. The stored form (schema 1)::

    {"schema": 1, "input": [3, 32, 32], "dtype": "float32",       # one sample; the batch is free
     "params": ["conv1.weight", ...], "buffers": ["bn1.running_mean", ...],
     "nodes": [["conv2d", [{"v": 0}, {"p": 0}, null, [1, 1], [1, 1], [1, 1], 1]], ...],
     "outputs": [{"v": 57}]}

A node is ``[op, args]`` or ``[op, args, kwargs]``. ``op`` names an entry of ``OPS``, a fixed
table of functional ATen operators (no in-place, random, device-moving or file-touching ones) whose
argument types come from torch's own schema; ``{"v": i}`` is value i (0: the input, i > 0: the
result of node i - 1), ``{"p": j}`` is tensor j of ``params + buffers``; every other argument is a
typed literal (int, float, bool, null, lists of them, ``{"dtype": ...}``, ``{"mf": ...}``, one of a
few enum strings). Two ops are compress's own: ``getitem`` (one result of a multi-result op) and
``sym_mul`` (the batch size times a constant: the only symbolic arithmetic, so every size is linear
in the batch, and no expression is ever parsed).

Nothing read from a file reaches a deserialiser, a code generator or ``eval``: ``parse`` turns the
JSON into ``Graph`` (checked ops of ``graph_ops``' table, references to earlier values only, literal sizes
capped), ``graph_model.check_cost`` runs it on the meta device at the shape of each call and totals its memory
and work by each op's own formula, and a call that asks for more than its weights justify (``limits``) is
refused before any real tensor is computed. Decoding is linear in the graph's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compress.errors import safe
from compress.graph.ops import MAX_RESULTS, NO_RANDOM, OP_NAMES, OPS, SAME_SHAPE, Op

__all__ = ["MAX_RESULTS", "OP_NAMES", "OPS", "Op", "GraphError", "Graph", "parse", "dump", "encode", "run"]

SCHEMA = 1
MAX_BATCH = 1 << 16
MAX_NODES = 50_000
MAX_ARGS = 16  # arguments of one node
MAX_LIST = 1024  # elements of one list argument
MAX_INT = 1 << 40  # magnitude of an integer literal
MAX_TENSORS = 20_000  # tensors a graph reads
MAX_MODULES = 50_000  # the containers their module paths ask for
MAX_DEPTH = 64  # parts of one module path
MAX_INPUT_DIMS = 6

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}
_STRINGS = frozenset("none tanh floor trunc reflect replicate circular constant mean sum".split())


class GraphError(ValueError):
    """A stored graph that compress will not run (or a model it cannot capture)."""


# ----------------------------------------------------------------------------- typed objects
@dataclass(frozen=True)
class Ref:
    """Value i of the graph: 0 is the input, i > 0 the result of node i - 1."""

    index: int


@dataclass(frozen=True)
class Tensor:
    """Tensor j of the graph's params + buffers."""

    index: int


@dataclass
class Node:
    op: Op
    args: list
    kwargs: dict


@dataclass
class Graph:
    """A checked graph: ops from ``OPS``, arguments typed, references only to earlier values."""

    input: tuple
    dtype: str
    params: list
    buffers: list
    nodes: list
    outputs: list
    frees: list  # frees[k]: the values no node after node k reads

    @property
    def tensors(self) -> list:
        return self.params + self.buffers

    def __deepcopy__(self, memo):  # checked once, never changed: copies of a model share it
        return self


# ----------------------------------------------------------------------------- parsing
def _int(v, lo=-MAX_INT, hi=MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class _Parser:
    def __init__(self, n_tensors: int):
        self.kinds = ["tensor"]  # the kind of each value: tensor, int or tuple
        self.n_tensors = n_tensors
        self.refs: list[int] = []  # values the node being parsed reads

    def ref(self, v, kind: str):
        if not isinstance(v, dict) or len(v) != 1:
            raise GraphError(f"expects a reference to a {kind}, got {safe(v)}")
        ((key, i),) = v.items()
        if key == "p" and kind == "tensor" and _int(i, 0, self.n_tensors - 1):
            return Tensor(i)
        if key == "v" and _int(i, 0, len(self.kinds) - 1):
            if self.kinds[i] != kind:
                raise GraphError(f"reads value {i}, a {self.kinds[i]}, where a {kind} belongs")
            self.refs.append(i)
            return Ref(i)
        raise GraphError(f"refers to {safe(v)}, which is not an earlier value or a stored tensor")

    def value(self, v, t: str, depth: int = 0):
        """A literal or reference of torch schema type ``t`` (``List[int]``, ``Optional[Tensor]``...)."""
        if t.startswith("Optional["):
            return None if v is None else self.value(v, t[9:-1], depth)
        if t.startswith("List["):
            if not isinstance(v, list) or len(v) > MAX_LIST or depth:
                raise GraphError(f"expects a list of at most {MAX_LIST} {t[5:-1]}, got {safe(v)}")
            return [self.value(x, t[5:-1], depth + 1) for x in v]
        if t in ("Tensor", "tuple", "symint"):
            return self.ref(v, {"Tensor": "tensor", "symint": "int"}.get(t, t))
        if t == "int":
            return v if _int(v) else self.ref(v, "int")
        if t == "bool" and isinstance(v, bool):
            return v
        if t in ("float", "number"):
            if isinstance(v, dict) and set(v) == {"f"} and v["f"] in ("inf", "-inf", "nan"):
                return float(v["f"])
            if isinstance(v, float) and math.isfinite(v) or _int(v) or (t == "number" and isinstance(v, bool)):
                return v
        if t == "str" and v in _STRINGS:
            return v
        if t == "ScalarType" and isinstance(v, dict) and set(v) == {"dtype"} and v["dtype"] in DTYPES:
            return DTYPES[v["dtype"]]
        if t == "MemoryFormat" and isinstance(v, dict) and set(v) == {"mf"} and v["mf"] in _FORMATS:
            return _FORMATS[v["mf"]]
        raise GraphError(f"expects {t}, got {safe(v)}")  # Layout and Device: only null (the defaults)

    def node(self, raw) -> Node:
        if not isinstance(raw, list) or len(raw) not in (2, 3) or not isinstance(raw[0], str):
            raise GraphError("has a node that is not [op, args] or [op, args, kwargs]")
        op = OPS.get(raw[0])
        if op is None:
            raise GraphError(f"calls {safe(raw[0])}, which is not in compress's table of operators")
        args, kwargs = raw[1], raw[2] if len(raw) == 3 else {}
        if not isinstance(args, list) or not isinstance(kwargs, dict) or len(args) + len(kwargs) > MAX_ARGS:
            raise GraphError(f"has a {op.name} node with malformed arguments")
        positional = [a for a in op.args if not a[2]]
        if len(args) > len(positional):
            raise GraphError(f"has a {op.name} node of {len(args)} arguments (it takes {len(positional)})")
        self.refs = []
        out_args = [self.where(op, a, v) for a, v in zip(positional, args, strict=False)]
        by_name = {a[0]: a for a in op.args}
        out_kw = {}
        for k, v in kwargs.items():
            a = by_name.get(k)
            if a is None or (not a[2] and positional.index(a) < len(args)):
                raise GraphError(f"has a {op.name} node with an unknown or repeated argument {safe(k)}")
            out_kw[k] = self.where(op, a, v)
        for a in op.args[len(args) :]:
            if a[3] and a[0] not in kwargs:
                raise GraphError(f"has a {op.name} node without its argument {a[0]!r}")
        if op.name == "sym_mul" and not _int(out_args[1], 1, 1 << 20):
            raise GraphError("has a sym_mul node that does not multiply the batch size by a constant from 1 to 2^20")
        random = NO_RANDOM.get(op.name)
        if random is not None:
            at = [a[0] for a in positional].index(random)
            p = out_kw[random] if random in out_kw else out_args[at] if at < len(out_args) else 0
            if p != 0 or isinstance(p, bool):
                raise GraphError(
                    f"has a {op.name} node whose {random} is {safe(p)}: it would make the model random (it must be 0)"
                )
        if op.name == "getitem" and not _int(out_args[1], 0, MAX_RESULTS - 1):
            raise GraphError("has a getitem node of a negative result index")
        self.kinds.append(op.returns)
        return Node(op, out_args, out_kw)

    def where(self, op: Op, a: tuple, v):
        try:
            return self.value(v, a[1])
        except GraphError as e:
            raise GraphError(f"has a {op.name} node whose argument {a[0]!r} {e}") from None


def _names(v, what: str) -> list:
    if not isinstance(v, list) or len(v) > MAX_TENSORS:
        raise GraphError(f"has a malformed {what} list")
    for n in v:
        if not (
            isinstance(n, str)
            and 0 < len(n) <= 400
            and n.count(".") < MAX_DEPTH
            and all(p.isidentifier() or p.isdigit() and p.isascii() for p in n.split("."))
        ):
            raise GraphError(f"has a tensor name {safe(n)} that is not a module path")
    return v


def _containers(names: list) -> int:
    """How many modules the tensors' paths ask the decoded model to create (counted up to the cap)."""
    seen: set[str] = set()
    for n in names:
        i = n.find(".")
        while i != -1 and len(seen) <= MAX_MODULES:
            seen.add(n[:i])
            i = n.find(".", i + 1)
    return len(seen)


def parse(doc: Any) -> Graph:
    """The checked ``Graph`` of stored data, or GraphError; time and memory linear in its size."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise GraphError(
            f"is not a graph of schema {SCHEMA} (found {safe(found)}; an older compress wrote it "
            "with torch.export's format, which compress no longer runs)"
        )
    extra = set(doc) - {"schema", "input", "dtype", "params", "buffers", "nodes", "outputs"}
    if extra:
        raise GraphError(f"has fields compress does not know ({safe(sorted(extra)[0])})")
    shape, dtype = doc.get("input"), doc.get("dtype")
    if not (isinstance(shape, list) and len(shape) <= MAX_INPUT_DIMS and all(_int(s, 1, 1 << 20) for s in shape)):
        raise GraphError(f"has an input shape {safe(shape)} compress does not take")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise GraphError(f"has an input of dtype {safe(dtype)}")
    params, buffers = _names(doc.get("params"), "params"), _names(doc.get("buffers"), "buffers")
    if len(set(params + buffers)) != len(params) + len(buffers):
        raise GraphError("names a tensor twice")
    if _containers(params + buffers) > MAX_MODULES:
        raise GraphError(f"asks for more than {MAX_MODULES:,} modules to hold its tensors")
    nodes_raw = doc.get("nodes")
    if not isinstance(nodes_raw, list) or not 0 < len(nodes_raw) <= MAX_NODES:
        raise GraphError(f"has no nodes, or more than {MAX_NODES:,}")
    p = _Parser(len(params) + len(buffers))
    last = {}  # value -> the last node that reads it
    nodes = []
    for k, raw in enumerate(nodes_raw):
        nodes.append(p.node(raw))
        for i in p.refs:
            last[i] = k
    outs = doc.get("outputs")
    if not isinstance(outs, list) or not 0 < len(outs) <= MAX_ARGS:
        raise GraphError("has malformed outputs")
    p.refs = []
    outputs = [p.ref(o, "tensor") for o in outs]
    kept = {r.index for r in outputs if isinstance(r, Ref)}
    frees: list[list[int]] = [[] for _ in nodes]
    for i, k in last.items():
        if i not in kept:
            frees[k].append(i)
    for k in range(len(nodes)):  # a result no node reads is dropped at once
        if k + 1 not in last and k + 1 not in kept:
            frees[k].append(k + 1)
    return Graph(tuple(shape), dtype, params, buffers, nodes, outputs, frees)


def encode(v):
    """An argument as stored data: references, dtypes, memory formats and non-finite floats tagged."""
    if isinstance(v, Ref):
        return {"v": v.index}
    if isinstance(v, Tensor):
        return {"p": v.index}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, dict):
        return {k: encode(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.memory_format):
        return {"mf": str(v).replace("torch.", "")}
    if isinstance(v, float) and not math.isfinite(v):
        return {"f": str(v)}
    return v


def dump(g: Graph) -> dict:
    """``parse``'s inverse: the stored form of a graph."""
    nodes = [[n.op.name, encode(n.args)] + ([encode(n.kwargs)] if n.kwargs else []) for n in g.nodes]
    return {
        "schema": SCHEMA,
        "input": list(g.input),
        "dtype": g.dtype,
        "params": list(g.params),
        "buffers": list(g.buffers),
        "nodes": nodes,
        "outputs": encode(g.outputs),
    }


# ----------------------------------------------------------------------------- running
def _get(v, values, tensors):
    if isinstance(v, Ref):
        return values[v.index]
    if isinstance(v, Tensor):
        return tensors[v.index]
    if isinstance(v, list):
        return [_get(x, values, tensors) for x in v]
    return v


def run(g: Graph, x: torch.Tensor, tensors: list, watch=None, before=None):
    """Interpret ``g`` on input ``x`` with ``tensors`` (params + buffers, in order); each value is
    dropped after the last node that reads it. ``before(k, node, args, kwargs)`` and ``watch(k, node,
    args, kwargs, out, values)``: called before and after each node (the cost check, on the meta device)."""
    values: list = [x]
    shapes_only = x.device.type == "meta"
    for k, node in enumerate(g.nodes):
        args = [_get(a, values, tensors) for a in node.args]
        kwargs = {n: _get(a, values, tensors) for n, a in node.kwargs.items()}
        if before is not None:
            before(k, node, args, kwargs)
        if shapes_only and node.op.name in SAME_SHAPE and isinstance(args[0], torch.Tensor):
            out = args[0]
        else:
            out = node.op.fn(*args, **kwargs)
        values.append(out)
        if watch is not None:
            watch(k, node, args, kwargs, out, values)
        for i in g.frees[k]:
            values[i] = None
    outs = [_get(o, values, tensors) for o in g.outputs]
    return outs[0] if len(outs) == 1 else tuple(outs)
