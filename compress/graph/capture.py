"""Capture: a model's forward, exported with ``torch.export`` (eval mode, CPU, batch dimension
dynamic), written in compress's graph schema (``graph.py``) and checked by the same ``parse`` that
reads it back. Only the capture uses torch.export; what is stored is compress's own data.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn as nn

from compress.errors import first_line
from compress.graph.program import MAX_BATCH, OP_NAMES, OPS, SCHEMA, GraphError, dump, encode, parse


def _arg(v, slots: dict):
    if isinstance(v, torch.fx.Node):
        if v not in slots:
            raise GraphError(f"reads {v.name}, which compress cannot store")
        return slots[v]
    if isinstance(v, (list, tuple)):
        return [_arg(x, slots) for x in v]
    if isinstance(v, torch.layout) and v == torch.strided:
        return None
    if isinstance(v, torch.device):
        raise GraphError("moves tensors between devices")
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.memory_format)):
        return v
    raise GraphError(f"has an argument of type {type(v).__name__}")


_DROP = ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range")


def capture(model: nn.Module, input_shape) -> dict:
    """The model's forward (eval mode, on the CPU, any batch size) as checked graph data."""
    from torch.export import Dim
    from torch.export.graph_signature import InputKind, OutputKind

    m = copy.deepcopy(model).cpu().eval()
    x = torch.zeros((2,) + tuple(input_shape[1:]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's own deprecations are not the user's business
            ep = torch.export.export(
                m, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},), strict=False
            )  # torch 2.6-2.7 default to strict, which cannot trace attention
            ep = ep.run_decompositions({})  # functional: no in-place ops
    except Exception as e:
        raise GraphError(f"torch.export cannot capture it ({first_line(e)})") from e
    sig = ep.graph_signature
    params = [s.target for s in sig.input_specs if s.kind == InputKind.PARAMETER]
    buffers = [s.target for s in sig.input_specs if s.kind == InputKind.BUFFER]
    index = {n: k for k, n in enumerate(params + buffers)}
    if any(s.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.USER_INPUT) for s in sig.input_specs) or any(
        s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs
    ):
        raise GraphError("its forward creates tensor constants or changes buffers")
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    slots, nodes, outputs = {}, [], []
    for n, spec in zip(placeholders, sig.input_specs, strict=True):
        slots[n] = {"v": 0} if spec.kind == InputKind.USER_INPUT else {"p": index[spec.target]}
    for n in ep.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", "")
            if isinstance(n.target, torch._ops.OpOverload) and n.target._opname in _DROP:
                continue
            if n.target is operator.getitem:
                op = "getitem"
            elif n.target is operator.mul:
                op = "sym_mul"
            else:
                op = OP_NAMES.get(n.target)  # type: ignore[assignment]  # None: checked below
            if op is None:
                raise GraphError(
                    f"its forward calls {n.target if name else type(n.target).__name__}, which is not "
                    "in compress's table of operators"
                )
            args = [_arg(a, slots) for a in n.args]
            if (
                op.endswith(".Tensor")
                and len(args) > 1
                and isinstance(args[1], (int, float))
                and op[:-7] + ".Scalar" in OPS
            ):  # ``x * 0.5`` is mul.Tensor(x, 0.5) in torch.export
                op = op[:-7] + ".Scalar"
            if op == "sym_mul" and isinstance(args[0], int):
                args.reverse()
            kwargs = {k: _arg(v, slots) for k, v in n.kwargs.items()}
            nodes.append([op, args, kwargs] if kwargs else [op, args])
            slots[n] = {"v": len(nodes)}
        elif n.op == "output":
            outputs = [_arg(a, slots) for a in n.args[0]]
    doc = dump(
        parse(
            {
                "schema": SCHEMA,
                "input": list(input_shape[1:]),
                "dtype": "float32",
                "params": params,
                "buffers": buffers,
                "nodes": encode(nodes),
                "outputs": outputs,
            }
        )
    )
    return doc
