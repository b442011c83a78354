"""The architecture of a model as plain data (never pickled Python).

A module tree is described node by node: the class (only ``torch.nn`` and ``compress`` module
classes are allowed), its plain attributes (numbers, strings, booleans, None, tuples and lists of
them), its children, and the names/shapes of its parameters and buffers. Rebuilding creates each
node with ``cls.__new__`` + ``nn.Module.__init__`` and restores the attributes -- what unpickling
does, minus the ability of the file to name any other code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import param, safe
from compress.quant_state import STATE_ATTRS
from compress.user_code import USER_PREFIX

_INTERNAL = set(vars(nn.Module()).keys())
# the modules of compress whose nn.Module classes a file may name (the zoo, and what methods insert)
OWN_MODULES = ("compress.models",)
# classes that moved: files written before still name them where they were
MOVED = {"compress.prune.channel_union.ResidualIdentity": "compress.models.blocks.ResidualIdentity"}
_SKIP = set(STATE_ATTRS)  # stored with the tensor sections instead
_LEAF = (type(None), bool, int, float, str)
# functions a torch.nn module may hold as an attribute (TransformerEncoderLayer's ``activation``):
# stored by name, resolved only from this list of torch.nn.functional's pure tensor functions
FUNCTIONS = frozenset(
    """relu relu6 gelu silu mish hardswish hardsigmoid hardtanh sigmoid tanh leaky_relu elu selu
celu softplus softsign glu logsigmoid softmax log_softmax tanhshrink""".split()
)


def _class_path(cls: type) -> str:
    """``module.Class``; a class of a file loaded by path is named as if imported (``mynet.MyNet``), so that
    ``--arch mynet:build`` and ``--arch path/to/mynet.py:build`` name the same classes."""
    module = cls.__module__
    return f"{module[len(USER_PREFIX) :] if module.startswith(USER_PREFIX) else module}.{cls.__qualname__}"


def _own(path: str) -> bool:
    """A class a .cpz may name as data: torch.nn's, or one of compress's model modules."""
    return path.startswith("torch.nn.") or any(path.startswith(m + ".") for m in OWN_MODULES)


def resolve_class(path: str) -> type:
    """An allow-listed nn.Module class from its path, or ValueError. Nothing is imported that the file
    names: torch.nn's classes come from modules torch has already imported, compress's from the model
    modules in ``OWN_MODULES``."""
    if not isinstance(path, str) or path.count(".") > 12:
        raise ValueError(f"class {safe(path)} is not allowed in a .cpz (only torch.nn and compress modules)")
    path = MOVED.get(path, path)
    mod, _, name = path.rpartition(".")
    if any(mod == m or mod.startswith(m + ".") for m in OWN_MODULES):
        importlib.import_module(OWN_MODULES[0])  # the zoo: registers every model family and the blocks
    elif not mod.startswith("torch.nn.") or name.startswith("_"):
        raise ValueError(f"class {safe(path)} is not allowed in a .cpz (only torch.nn and compress modules)")
    obj = getattr(sys.modules.get(mod), name, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)) or obj.__module__ != mod:
        raise ValueError(f"class {safe(path)} is not an nn.Module class of torch.nn or compress")
    return obj


def _enc(v: Any, where: str):
    if isinstance(v, _LEAF):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return {"f": repr(v)}
        return v
    if isinstance(v, tuple):
        return {"t": [_enc(x, where) for x in v]}
    if isinstance(v, list):
        return [_enc(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"d": {k: _enc(x, where) for k, x in v.items()}}
    if isinstance(v, torch.Tensor) and v.numel() <= 64:
        return {"tensor": v.detach().cpu().tolist(), "dtype": str(v.dtype).replace("torch.", "")}
    name = getattr(v, "__name__", None)
    if name in FUNCTIONS and getattr(F, name) is v:
        return {"fn": name}
    raise TypeError(f"{where}: attribute of type {type(v).__name__} cannot be stored as data")


def encode_value(v: Any, where: str):
    """A plain value (numbers, strings, lists, tuples, str-keyed dicts, small tensors) as JSON data."""
    return _enc(v, where)


def decode_value(v: Any):
    """``encode_value``'s inverse; ValueError on anything else."""
    return _dec(v)


def _dec(v: Any, depth: int = 0):
    if depth > 32:
        raise ValueError("attribute nesting too deep")
    if isinstance(v, _LEAF):
        return v
    if isinstance(v, list):
        return [_dec(x, depth + 1) for x in v]
    if isinstance(v, dict):
        if set(v) == {"t"} and isinstance(v["t"], list):
            return tuple(_dec(x, depth + 1) for x in v["t"])
        if set(v) == {"d"} and isinstance(v["d"], dict):
            return {str(k): _dec(x, depth + 1) for k, x in v["d"].items()}
        if set(v) == {"f"} and v["f"] in ("nan", "inf", "-inf"):
            return float(v["f"])
        if set(v) == {"tensor", "dtype"} and v["dtype"] in ("float32", "float64", "int64", "int32", "bool"):
            return torch.tensor(v["tensor"], dtype=getattr(torch, v["dtype"]))
        if set(v) == {"fn"} and v["fn"] in FUNCTIONS:
            return getattr(F, v["fn"])
    raise ValueError("malformed attribute value")


def foreign_classes(model: nn.Module) -> list[str]:
    """Classes in ``model`` that are neither torch.nn nor compress ones (the user's own)."""
    out = []
    for m in model.modules():
        path = _class_path(type(m))
        if not _own(path) and path not in out:
            out.append(path)
    return out


def describe(model: nn.Module) -> dict:
    """The module tree as JSON-able data; parameters/buffers listed by name and shape.

    A module of any other class (the user's own: ``mypkg.ResNet``) becomes a *reference* node,
    ``{"ref": "mypkg.ResNet", ...}``: its plain attributes, tensors and children are data as
    everywhere else, but the module itself can only be rebuilt from the user's own code
    (``rebuild(..., base=...)``, the model their ``--arch`` builds) -- the file never names code
    that runs."""

    def node(m: nn.Module, where: str) -> dict:
        cls = type(m)
        path = _class_path(cls)
        own = _own(path)
        attrs = {}
        for k, v in vars(m).items():
            if k in _INTERNAL or k in _SKIP or k.startswith("__"):
                continue
            try:
                attrs[k] = _enc(v, f"{where}.{k}")
            except TypeError:
                if own:
                    raise
                # the user's constructor sets it again (a function, a layer list, ...)
        out = {
            "class" if own else "ref": path,
            "attrs": attrs,
            "params": {
                k: None if p is None else [list(p.shape), bool(p.requires_grad)] for k, p in m._parameters.items()
            },
            "buffers": {
                k: None if b is None else [list(b.shape), str(b.dtype).replace("torch.", "")]
                for k, b in m._buffers.items()
            },
            "children": {k: node(c, f"{where}.{k}" if where else k) for k, c in m._modules.items() if c is not None},
        }
        return out

    return node(model, "")


_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bool": torch.bool,
}


MAX_MODULES = 50_000


class NeedsArch(ValueError):
    """The architecture references classes of the user's own code: rebuild it with ``base``."""

    def __init__(self, classes: list[str]):
        super().__init__(
            f"it holds classes of your own code ({', '.join(safe(c) for c in classes[:3])}"
            f"{', ...' if len(classes) > 3 else ''})"
        )
        self.classes = classes


class ArchMismatch(ValueError):
    """The model the user's code builds does not have the modules the file refers to."""


def references(spec: Any, depth: int = 0) -> list[str]:
    """The user classes an architecture refers to (empty: rebuilt from data alone)."""
    if not isinstance(spec, dict) or depth > 64:
        return []
    out = [spec["ref"]] if isinstance(spec.get("ref"), str) else []
    children = spec.get("children")
    for c in children.values() if isinstance(children, dict) else []:
        out += [r for r in references(c, depth + 1) if r not in out]
    return out


def _is_name(k) -> bool:
    """A name from a file that becomes a module's, parameter's or attribute's name: a Python identifier or
    an ASCII index (``Sequential``'s "0"), at most 200 characters -- never a control character or an escape
    sequence that a report's layer table would print."""
    return isinstance(k, str) and 0 < len(k) <= 200 and (k.isidentifier() or k.isascii() and k.isdigit())


def rebuild(
    spec: dict,
    tensors: dict[str, torch.Tensor],
    depth: int = 0,
    prefix: str = "",
    _count: list | None = None,
    base: nn.Module | None = None,
) -> nn.Module:
    """Rebuild a module tree from ``describe``'s data and a {fqn: tensor} map (shapes checked).
    ``base``: the model the user's own code builds, whose modules stand for the reference nodes
    (their attributes, tensors and children are then set from the data)."""
    _count = _count if _count is not None else [0]
    _count[0] += 1
    if _count[0] > MAX_MODULES:
        raise ValueError(f"more than {MAX_MODULES:,} modules")
    if depth > 64 or not isinstance(spec, dict):
        raise ValueError("malformed architecture")
    for key in ("attrs", "params", "buffers", "children"):
        if key not in spec:
            raise ValueError(f"architecture node lacks {key!r}")
    if "ref" in spec:
        where = prefix.rstrip(".") or "the model"
        if base is None:
            if depth:  # the user's model has no module here
                raise ArchMismatch(
                    f"the model your {param('arch')} builds has no {safe(where)} (a {safe(spec['ref'])})"
                )
            raise NeedsArch(references(spec))
        if not isinstance(spec["ref"], str) or _class_path(type(base)) != spec["ref"]:
            raise ArchMismatch(
                f"{safe(where)} is {safe(spec['ref'])} in the file, but {_class_path(type(base))!r} in the "
                f"model your {param('arch')} builds"
            )
        m = base
        m._parameters.clear()  # set from the data below
        m._buffers.clear()
    else:
        if "class" not in spec:
            raise ValueError("architecture node lacks 'class'")
        cls = resolve_class(spec["class"])
        m = object.__new__(cls)
        nn.Module.__init__(m)
    if not isinstance(spec["attrs"], dict):
        raise ValueError("malformed attributes")
    for k, v in spec["attrs"].items():
        if not _is_name(k) or k in _INTERNAL or k.startswith("__"):
            raise ValueError(f"attribute {safe(k)} not allowed")
        object.__setattr__(m, k, _dec(v))
    for kind in ("params", "buffers"):
        if not isinstance(spec[kind], dict):
            raise ValueError(f"malformed {kind}")
        for k, meta in spec[kind].items():
            if not _is_name(k):
                raise ValueError(f"{kind[:-1]} name {safe(k)} is not an identifier")
            fqn = f"{prefix}{k}"
            if meta is None:  # e.g. a conv without bias
                (m._parameters if kind == "params" else m._buffers)[k] = None
                continue
            if fqn not in tensors:
                raise ValueError(f"tensor {fqn} missing")
            t = tensors[fqn]
            if not isinstance(meta, list) or len(meta) != 2 or list(t.shape) != meta[0]:
                raise ValueError(f"tensor {fqn} has the wrong shape")
            if kind == "params":
                m._parameters[k] = nn.Parameter(t, requires_grad=bool(meta[1]) and t.is_floating_point())
            else:
                if meta[1] not in _DTYPES or t.dtype != _DTYPES[meta[1]]:
                    raise ValueError(f"buffer {fqn} has the wrong dtype")
                m._buffers[k] = t
    if not isinstance(spec["children"], dict):
        raise ValueError("malformed children")
    base_children = dict(base._modules) if base is not None else {}  # the user's modules, by name
    m._modules.clear()
    for k, child in spec["children"].items():
        if not _is_name(k):
            raise ValueError(f"module name {safe(k)} is not an identifier or an index")
        m._modules[k] = rebuild(child, tensors, depth + 1, f"{prefix}{k}.", _count, base_children.get(k))
    return m
