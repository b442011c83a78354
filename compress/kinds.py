"""The kinds of model compress handles, told apart by their type.

A plain ``nn.Module`` has layers that a method changes, ONNX exports and a .cpz stores. Two kinds are
models of their own: ``graph.model.GraphModel``, decoded from a .cpz's stored graph (it runs, but has no
layers), and ``quantize.int8.Int8Model``, whose layers are packed INT8 kernels PyTorch runs as integers.
Each question whose answer depends on the kind is a generic function (``functools.singledispatch``)
answered here for a plain module; the module that defines a kind registers its own answers
(``@refusal.register(Int8Model)``), so that a lower layer asks without importing the kinds.
Sizes and counts dispatch the same way where they are defined (``counting.counts``,
``cpz.stats.size_bytes``, ``torch_files.save_torch``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from compress.errors import CompressError

# what refusal() is asked about
CHANGE = "change"  # a method changes the model through its layers
ONNX = "onnx"  # ONNX is exported from its layers
CPZ = "cpz"  # its tensors are stored in a .cpz
INT8 = "int8"  # it is the float architecture an INT8 model is rebuilt from


@functools.singledispatch
def refusal(model: Any, action: str) -> CompressError | None:
    """The error for doing ``action`` (CHANGE, ONNX, CPZ, INT8) to this model, or None where it can be done."""
    return None


@functools.singledispatch
def execution(model: Any) -> dict[str, Any] | None:
    """How a model that does not run as float layers executes (an INT8 model's table, for its summary and
    report), or None for a plain module."""
    return None


@functools.singledispatch
def keeps_input_shape(model: Any) -> bool:
    """True for a model whose input shape is fixed where it was made (an INT8 model's conversion) or that holds
    no metadata (TorchScript): saving it with another shape leaves its metadata as it is."""
    return False


@keeps_input_shape.register(torch.jit.ScriptModule)
def _(model) -> bool:
    return True
