"""A model's computation as a ``torch.export`` graph: data a decoder checks before anything runs.

A .cpz stores the structure of a model of the user's own classes as *references* to their code
(``arch.py``); decoding it needs their ``--arch``. When the model exports (``torch.export``, batch
dimension dynamic), the file also holds its graph -- ATen operators and the tensors they read, as
JSON -- so it can be decoded and run where the user's code is not: the result is a
``torch.fx.GraphModule`` with the same parameters, buffers and outputs.

The graph is untrusted input on the way back. torch's own loader (``torch.export.load``) unpickles,
and the serialized form can name any callable under ``torch``, carry guard code that is compiled to
Python, and sympy expressions that are ``eval``-ed. So before torch sees a graph, ``check`` walks it:
every operator must be one of ``ALLOWED_OPS`` (ATen compute, shape and normalisation ops: none
touches files, processes or Python objects), symbolic sizes must be plain integer expressions of the
batch symbol, names must be identifiers, and guard code, custom objects, subgraphs and constants
must be absent. Node metadata (source stack traces) is dropped on writing: LeNet-5's graph costs
about 1.3 KB in the file, a ResNet-20's 5 KB, a MobileNetV2's 11 KB.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any

import torch
import torch.nn as nn

from ..errors import first_line

ATTR = "compress_graph"  # on a module decoded from its graph: the checked graph it was built from
MAX_BATCH = 1 << 16
MAX_NODES = 200_000

ALLOWED_OPS = frozenset("""
conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d conv_transpose3d linear addmm
mm bmm matmul baddbmm t einsum
batch_norm _native_batch_norm_legit_no_training native_batch_norm layer_norm native_layer_norm group_norm
native_group_norm instance_norm rms_norm
relu relu_ relu6 hardtanh hardtanh_ hardswish hardswish_ hardsigmoid hardsigmoid_ sigmoid sigmoid_ silu silu_
gelu gelu_ tanh tanh_ leaky_relu leaky_relu_ elu elu_ prelu _prelu_kernel mish softplus glu softmax _softmax
log_softmax _log_softmax
add add_ sub sub_ rsub mul mul_ div div_ neg abs sqrt rsqrt pow exp log clamp clamp_ clamp_min clamp_max
maximum minimum where erf reciprocal sign floor ceil round eq ne lt gt le ge logical_not logical_and
max_pool1d max_pool2d max_pool2d_with_indices avg_pool1d avg_pool2d adaptive_avg_pool1d adaptive_avg_pool2d
_adaptive_avg_pool2d adaptive_max_pool2d upsample_nearest2d upsample_bilinear2d _upsample_nearest_exact2d
pixel_shuffle pixel_unshuffle pad constant_pad_nd reflection_pad2d replication_pad2d channel_shuffle
native_channel_shuffle
mean sum amax amin max min argmax var std norm linalg_vector_norm cumsum
view _unsafe_view reshape flatten unflatten permute transpose contiguous clone cat stack split
split_with_sizes chunk unbind slice select narrow squeeze unsqueeze expand expand_as repeat index_select gather
roll flip alias detach sym_size sym_numel sym_stride _to_copy to type_as zeros_like ones_like full_like
zeros ones full arange scalar_tensor dropout native_dropout feature_dropout masked_fill tril triu
scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu _native_multi_head_attention
_assert_tensor_metadata _assert_scalar sym_constrain_range_for_size
""".split())
_OPERATOR = frozenset("getitem add sub mul floordiv truediv mod neg eq ne lt le gt ge".split())
_TORCH_SYM = frozenset("sym_max sym_min sym_float sym_int sym_not".split())
_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\Z")
_AS_KEYS = frozenset("""as_tensor as_tensors as_optional_tensor as_optional_tensors as_int as_ints as_float
as_floats as_bool as_bools as_none as_name as_expr as_sym_int as_sym_ints as_sym_float as_sym_bool
as_scalar_type as_memory_format as_layout as_device as_string as_strings""".split())
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_FQN = re.compile(r"[A-Za-z0-9_.]{0,400}\Z")
# sympy's srepr of an integer expression of the batch symbol: sympify() evaluates these strings
_EXPR = re.compile(r"(?:Symbol\('s\d{1,6}', positive=True, integer=True\)|Integer\(-?\d{1,12}\)|"
                   r"(?:Mul|Add|FloorDiv|Mod|CeilToInt|Max|Min)\(|\)|, )*\Z")
_SPEC_TYPES = (None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict")


class GraphError(ValueError):
    """A stored graph that compress will not run (or a model it cannot export)."""


def stored(model: nn.Module) -> dict | None:
    """The graph a module was decoded from (it has no layers of its own), or None."""
    return getattr(model, ATTR, None)


def capture(model: nn.Module, input_shape) -> dict:
    """The model's forward (eval mode, on the CPU, any batch size) as checked JSON data."""
    from torch._export.serde.serialize import serialize
    from torch.export import Dim

    m = copy.deepcopy(model).cpu().eval()
    x = torch.zeros((2,) + tuple(input_shape[1:]))
    try:
        with torch.no_grad():
            ep = torch.export.export(m, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=MAX_BATCH)},))
        art = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    except Exception as e:
        raise GraphError(f"torch.export cannot capture it ({first_line(e)})") from e
    if ep.constants:
        raise GraphError(f"its forward creates tensor constants ({', '.join(list(ep.constants)[:3])})")
    doc = json.loads(art.exported_program)
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}  # stack traces and module paths: the largest part, and not needed to run
    doc["guards_code"] = []
    check(doc)
    return doc


def _target_ok(t: Any) -> bool:
    if not isinstance(t, str):
        return False
    m = _TARGET.match(t)
    if m:
        return m.group(1) in ALLOWED_OPS
    mod, _, name = t.partition(".")
    return (mod == "_operator" and name in _OPERATOR) or (mod == "torch" and name in _TORCH_SYM)


def _walk(v: Any, depth: int = 0) -> None:
    if depth > 64:
        raise GraphError("nested too deeply")
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise GraphError("malformed graph")
            if k.startswith("as_") and k not in _AS_KEYS:
                raise GraphError(f"holds a {k[3:]!r} value, which compress does not run")
            if k == "expr_str" and not (isinstance(x, str) and len(x) <= 512 and _EXPR.match(x)):
                raise GraphError(f"symbolic size {str(x)[:60]!r} is not a plain integer expression")
            if k == "name" and isinstance(x, str) and not _IDENT.match(x):
                raise GraphError(f"name {x[:60]!r} is not an identifier")
            if k in ("parameter_name", "buffer_name", "fqn") and not (isinstance(x, str) and _FQN.match(x)):
                raise GraphError(f"{k} {str(x)[:60]!r} is not a module path")
            if k in ("in_spec", "out_spec") and x is not None:
                _check_treespec(x)
            _walk(x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _walk(x, depth + 1)


def _check_treespec(s: Any) -> None:
    try:
        spec = json.loads(s)
    except (TypeError, ValueError) as e:
        raise GraphError("malformed input/output structure") from e

    def walk(node, depth=0):
        if depth > 32:
            raise GraphError("input/output structure nested too deeply")
        if isinstance(node, dict):
            if "type" in node and node["type"] not in _SPEC_TYPES:
                raise GraphError(f"input/output of type {str(node['type'])[:60]!r} is not supported")
            for x in node.values():
                walk(x, depth + 1)
        elif isinstance(node, list):
            for x in node:
                walk(x, depth + 1)
    walk(spec)


def check(doc: Any) -> None:
    """Raise GraphError unless ``doc`` is a graph compress will run (see the module docstring)."""
    try:
        _check(doc)
    except (TypeError, AttributeError, KeyError, IndexError, StopIteration) as e:  # wrong shapes of data
        raise GraphError(f"is malformed ({type(e).__name__})") from e


def _check(doc: Any) -> None:
    try:
        gm, graph = doc["graph_module"], doc["graph_module"]["graph"]
        nodes, sig = graph["nodes"], gm["signature"]
    except (TypeError, KeyError) as e:
        raise GraphError("malformed graph") from e
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES:
        raise GraphError("malformed graph (node list)")
    if doc.get("guards_code") or graph.get("custom_obj_values") or gm.get("treespec_namedtuple_fields"):
        raise GraphError("holds guard code, custom objects or named tuples, which compress does not run")
    for r in (doc.get("range_constraints") or {}):
        if not re.match(r"s\d{1,6}\Z", str(r)):
            raise GraphError(f"malformed symbol {str(r)[:40]!r}")
    for n in nodes:
        if not isinstance(n, dict) or not _target_ok(n.get("target")):
            t = n.get("target") if isinstance(n, dict) else None
            raise GraphError(f"calls {str(t)[:80]!r}, which is not on compress's allow-list of ATen operators")
    for spec in sig.get("input_specs", []):
        if not isinstance(spec, dict) or len(spec) != 1 or set(spec) - {"parameter", "buffer", "user_input"}:
            raise GraphError(f"has an input of kind {sorted(spec) if isinstance(spec, dict) else spec!r}")
    for spec in sig.get("output_specs", []):
        if not isinstance(spec, dict) or set(spec) != {"user_output"}:
            raise GraphError(f"has an output of kind {sorted(spec) if isinstance(spec, dict) else spec!r}")
    _walk(doc)


def rebuild(doc: Any, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The checked graph with ``tensors`` (by parameter/buffer name) as a runnable module."""
    from torch._export.serde.serialize import SerializedArtifact, deserialize

    check(doc)
    state = {}
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        kind = next(iter(spec))
        if kind == "user_input":
            continue
        name = spec[kind].get(f"{kind}_name") if isinstance(spec[kind], dict) else None
        if name not in tensors:
            raise GraphError(f"the graph reads {str(name)[:80]!r}, which the file does not hold")
        t = tensors[name]
        state[name] = nn.Parameter(t, requires_grad=t.is_floating_point()) if kind == "parameter" else t
    try:
        ep = deserialize(SerializedArtifact(json.dumps(doc).encode(), state, {}, {}))
        model = ep.module(check_guards=False)  # no guard code generated; input shapes checked by a hook
    except Exception as e:  # a graph from another torch version, or one torch rejects
        raise GraphError(f"torch {torch.__version__} cannot rebuild it (written by torch "
                         f"{str(doc.get('torch_version'))[:20]}: {first_line(e)})") from e
    for name in ("train", "eval"):  # torch refuses mode switches: the graph is fixed in eval mode, so
        vars(model).pop(name, None)  # compress lets them set the flags (and BatchNorm stays in eval mode)
    setattr(model, ATTR, doc)
    return model.eval()
