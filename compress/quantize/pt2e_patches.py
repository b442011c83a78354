"""Two corrections to torchao's PT2E passes, each put in place only while a block runs (``patched``) and put
back after, so nothing outside compress sees them.

* ``patterns``: QAT's prepare fuses conv + batch norm, and its convert folds them back, by matching patterns
  that torchao makes with torch.export each time, for every kind of convolution (1-D, 2-D, transposed) and
  every variant (per-channel, bias, training): 126 exports at 0.4 s each, 48 s of every QAT convert of even a
  LeNet. Each pattern is made once a process (a copy is handed out: the rewriter copies from patterns and never
  changes them), and the kinds of convolution the graph has none of are skipped (their search only finds
  nothing).
* ``bn_folded_where_alone``: torchao's PTQ prepare folds a batch norm into the convolution before it even where
  something else reads that convolution; compress folds only where the batch norm is the one reader.

And one pass over the exported graph's metadata before torchao reads it (``one_partition_per_call``): a module
called in several places is one "source partition" to torchao's matcher, which refuses it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

_PATTERNS: dict[Any, torch.fx.GraphModule] = {}


@contextlib.contextmanager
def patched(settings: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Each ``(module, name, value)`` set while the block runs, the original put back after (also on error)."""
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in settings]
    try:
        for mod, name, value in settings:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, original in reversed(saved):
            setattr(mod, name, original)


def _pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> Any:
    """What an exported pattern depends on: the function's code, what its closure holds, and the inputs' shapes and
    dtypes (their values are random); None where that is not hashable (it is then made as torchao makes it)."""

    def sig(v: Any) -> Any:
        return ("tensor", tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else v

    if isinstance(pattern, nn.Module):  # torchao's WrapperModule around the function, nothing else in it
        fn = getattr(pattern, "fn", None)
        if (
            type(pattern).__name__ != "WrapperModule"
            or next(pattern.state_dict().values().__iter__(), None) is not None
        ):
            return None
        pattern = fn
    code = getattr(pattern, "__code__", None)
    if code is None:
        return None
    try:
        key = (
            code,
            tuple(c.cell_contents for c in pattern.__closure__ or ()),
            tuple(sig(x) for x in example_inputs),
            is_cuda,
            tuple(sorted((k, sig(v)) for k, v in kwargs.items())),
        )
        hash(key)
    except (TypeError, ValueError):  # an unhashable closure value, an empty cell
        return None
    return key


def _conv_ops(conv_fn: Any) -> tuple[Any, ...] | None:
    """The aten ops an exported graph calls for ``conv_fn`` (None: not a convolution this knows)."""
    aten, F = torch.ops.aten, torch.nn.functional
    return {
        F.conv1d: (aten.conv1d,),
        F.conv2d: (aten.conv2d,),
        F.conv_transpose1d: (aten.conv_transpose1d,),
        F.conv_transpose2d: (aten.conv_transpose2d,),
    }.get(conv_fn)


def _has_conv(m: torch.fx.GraphModule, conv_fn: Any) -> bool:
    ops = _conv_ops(conv_fn)
    return ops is None or any(getattr(n.target, "overloadpacket", None) in ops for n in m.graph.nodes)


@contextlib.contextmanager
def patterns() -> Iterator[None]:
    """torchao's pattern making memoised and its conv + batch-norm passes skipped for convolutions the graph lacks,
    while the block runs."""
    try:
        utils = importlib.import_module("torchao.quantization.pt2e.utils")
        qat = importlib.import_module("torchao.quantization.pt2e.qat_utils")
    except ImportError:
        yield
        return
    make = getattr(utils, "_get_aten_graph_module_for_pattern", None)
    fuse = getattr(qat, "_fuse_conv_bn_qat_helper", None)
    fold = getattr(qat, "_fold_conv_bn_qat_helper", None)
    if make is None or fuse is None or fold is None or getattr(make, "_compress_memo", False):
        yield  # another torchao than the one this was written against, or already inside
        return

    def made(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return make(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERNS:
            _PATTERNS[key] = make(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERNS[key])

    def only_present(helper):
        def run(m, conv_fn, example_inputs, is_cuda):
            return helper(m, conv_fn, example_inputs, is_cuda=is_cuda) if _has_conv(m, conv_fn) else m

        return run

    made._compress_memo = True  # type: ignore[attr-defined]
    settings = [
        (utils, "_get_aten_graph_module_for_pattern", made),
        (qat, "_fuse_conv_bn_qat_helper", only_present(fuse)),
        (qat, "_fold_conv_bn_qat_helper", only_present(fold)),
    ]
    if getattr(qat, "_get_aten_graph_module_for_pattern", None) is make:
        settings.append((qat, "_get_aten_graph_module_for_pattern", made))
    with patched(settings):
        yield


def fuse_conv_bn_alone(m: torch.fx.GraphModule) -> None:
    """torchao's ``_fuse_conv_bn_`` (batch norm folded into the convolution before it), only where the batch norm
    is the convolution's one user. torchao folds it whatever else reads the convolution, and the others then read
    normalised features: DenseNet's stem feeds its first unit's batch norm and the concatenation, and its PTQ
    model fell from 97.28% to 10.36% on MNIST's test set."""
    utils = importlib.import_module("torchao.quantization.pt2e.utils")
    bn_ops = (torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.batch_norm.default)
    fused: set = set()
    for bn in list(m.graph.nodes):
        if bn.op != "call_function" or bn.target not in bn_ops:
            continue
        conv = bn.args[0]
        if not utils._is_conv_or_conv_transpose_node(conv) or len(conv.users) != 1:
            continue
        weight, bias = conv.args[1], conv.args[2] if len(conv.args) > 2 else None
        utils.fold_bn_weights_into_conv_node(conv, weight, bias, bn, m, weight in fused)
        fused.add(weight)
    m.graph.eliminate_dead_code()
    m.recompile()


@contextlib.contextmanager
def bn_folded_where_alone() -> Iterator[None]:
    """``prepare_pt2e`` with ``fuse_conv_bn_alone`` in place of torchao's fusion, while the block runs."""
    try:
        mod = importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
        importlib.import_module("torchao.quantization.pt2e.utils").fold_bn_weights_into_conv_node  # noqa: B018
    except (ImportError, AttributeError):
        yield
        return
    if getattr(mod, "_fuse_conv_bn_", None) is None:
        yield
        return
    with patched([(mod, "_fuse_conv_bn_", fuse_conv_bn_alone)]):
        yield


CALL = "__call"  # a module's i-th call (i >= 1) in a graph that one_partition_per_call renamed: <name>__call<i>


def _source(node: torch.fx.Node) -> tuple[Any, Any] | None:
    """What torchao's ``get_source_partitions`` groups a node by: the last entry of ``source_fn_stack`` (strict
    export), else the innermost module of ``nn_module_stack`` (non-strict, as compress exports)."""
    stack = node.meta.get("source_fn_stack")
    if stack:
        return stack[-1][0], stack[-1][1]
    if node.op == "call_function" and node.meta.get("nn_module_stack"):
        return list(node.meta["nn_module_stack"].values())[-1]
    return None


def _rename(node: torch.fx.Node, name: str) -> None:
    """``node``'s partition name set to ``name``. Without ``source_fn_stack``, a new innermost module entry carries
    it, so the module's own entry (which torchao's module-name filters, and so ``keep_float``, match) stays."""
    stack = node.meta.get("source_fn_stack")
    if stack:
        stack = list(stack)
        stack[-1] = (name, stack[-1][1])
        node.meta["source_fn_stack"] = stack
        return
    modules = dict(node.meta["nn_module_stack"])  # the metadata's dict may be shared between nodes
    key = list(modules)[-1]
    modules[f"{key}{CALL}{name.rsplit(CALL, 1)[1]}"] = (name, modules[key][1])
    node.meta["nn_module_stack"] = modules


def _find(root: dict[torch.fx.Node, torch.fx.Node], n: torch.fx.Node) -> torch.fx.Node:
    """The call ``n`` belongs to (union-find, with path halving)."""
    while root[n] is not n:
        root[n] = root[root[n]]
        n = root[n]
    return n


def one_partition_per_call(m: torch.fx.GraphModule) -> int:
    """Each call of a module called in several places becomes a source partition of its own; returns how many
    calls were renamed.

    torchao's X86 quantizer groups nodes into source partitions by the module torch.export records for them
    (``_source``): a module called in several places (pytorchcv's ShuffleNetV2 calls one ReLU in up to three
    places of a unit) is then one partition with several outputs, and the quantizer refuses the whole model
    ("Input partition has more than one output node"). Here the nodes of such a group that are connected through
    their arguments are one call, and every call after the first is named ``<name>__call<i>``. Only groups with
    more than one output are touched, so every graph torchao accepted before is left as it was."""
    groups: dict[tuple[Any, Any], list[torch.fx.Node]] = {}
    for node in m.graph.nodes:
        src = _source(node)
        if src is not None:
            groups.setdefault(src, []).append(node)
    renamed = 0
    for (name, _), nodes in groups.items():
        members = set(nodes)
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(outputs) < 2:
            continue
        root = {n: n for n in nodes}
        for n in nodes:
            for a in n.all_input_nodes:
                if a in members:
                    root[_find(root, a)] = _find(root, n)
        calls = list(dict.fromkeys(_find(root, n) for n in nodes))
        for i, call in enumerate(calls[1:], 1):
            for n in nodes:
                if _find(root, n) is call:
                    _rename(n, f"{name}{CALL}{i}")
        renamed += len(calls) - 1
    return renamed
