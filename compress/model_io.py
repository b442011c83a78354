"""Which file format a model path holds, and the one place that dispatches on it.

It sits above ``io`` (torch files: TorchScript, state_dict + arch, whole modules) and ``coding``
(.cpz containers), so neither needs the other.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch.nn as nn

from compress import kinds
from compress.cpz.container import MAGIC, decode_model, load_cpz, save_cpz
from compress.errors import CompressWarning, InputError, param
from compress.filesystem import open_regular
from compress.meta import set_meta
from compress.method import check_shape
from compress.quantize.int8_file import rebuild
from compress.torch_files import build_arch, load_torch, save_torch


def is_cpz(path: Path) -> bool:
    with open_regular(path) as f:  # a FIFO or device named as a model is refused, never read or waited on
        return f.read(4) == MAGIC or path.suffix == ".cpz"


def kind(path: str | os.PathLike) -> str:
    """What an existing model file holds: "cpz", "onnx" or "torch" (everything ``io`` loads)."""
    path = Path(path)
    if is_cpz(path):
        return "cpz"
    return "onnx" if path.suffix == ".onnx" else "torch"


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How a command reads its model, stated once (``--arch``, ``--trust-pickle``, ``--input-shape``).

    Args:
        arch: ``module:callable``, ``path/to/file.py:callable`` or ``zoo:NAME`` that builds the architecture
            of a state_dict (or of a file of the user's own classes).
        trust_pickle: allow a file that runs code when loaded (TorchScript, arbitrary pickles).
        input_shape: (1, C, H, W) the model takes, where neither the data nor the file says it. The loaded
            model carries it in its metadata, so that every file written from it says it too.
    """

    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None

    def load(self, path: str | os.PathLike) -> nn.Module:
        model = load_model(path, arch=self.arch, trust_pickle=self.trust_pickle)
        if self.input_shape:
            record_shape(model, self.input_shape)
        return model


def record_shape(model: nn.Module, input_shape) -> None:
    """Note the (1, C, H, W) a model takes in its metadata (which every file compress writes carries). An
    INT8 model's shape is its conversion's and a TorchScript module holds no metadata: both are left as they
    are."""
    shape = check_shape(tuple(input_shape))
    if kinds.keeps_input_shape(model):
        return
    set_meta(model, input_shape=list(shape))


def load_model(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Load a model safely: a .cpz, a TorchScript archive, a state_dict with ``arch``, or a whole
    module whose classes are torch.nn / compress ones. Anything that would run code from the file
    needs ``trust_pickle=True``."""
    path = Path(path)
    try:
        return _load(path, arch, trust_pickle)
    except SystemExit as e:  # a file or module that tries to end the caller's program
        raise InputError(f"{path}: loading it tried to exit the program (SystemExit {e.code!r}); refused") from None


def _load(path: Path, arch: str | None, trust_pickle: bool) -> nn.Module:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a model file")
    base = arch_base(arch)
    what = kind(path)
    if what == "cpz":
        return load_cpz(path, base=base)
    if what == "onnx":
        raise InputError(f"{path} is an ONNX model; only `compress report` and `compress export` read ONNX")
    return load_torch(path, arch, trust_pickle, cpz=lambda blob: decode_model(blob, path, base=base), int8=rebuild)


def arch_base(arch: str | None):
    """What builds the user's own model for a file that refers to their classes: their --arch."""
    if arch is None:
        return None

    def build() -> nn.Module:
        model = build_arch(arch)
        set_meta(model, arch_ref=arch)
        return model

    return build


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    force: bool = False,
    *,
    input_shape: tuple[int, ...] | None = None,
    coder: str = "auto",
) -> Path:
    """Save atomically: a .cpz (Huffman-coded, architecture as data) for a ``.cpz`` path, else a
    torch file that compress loads again without trust.

    ``input_shape``: the (1, C, H, W) the model takes, recorded in its metadata and so in the file (default:
    the shape its metadata already says). ``coder`` (a .cpz): ``auto`` codes each stream in its smallest coding,
    ``huffman`` without ANS coding (the bytes of compress before it), ``context`` ANS-coded wherever it applies.
    A .cpz of a model of your own classes also holds its graph, as
    ``compress encode`` writes it, so that it loads without your code; that needs the input shape, and
    where no graph can be stored a ``CompressWarning`` says why (the file then loads with ``arch=``)."""
    path = Path(path)
    if input_shape is not None:
        record_shape(model, input_shape)
    if path.suffix == ".cpz":  # the container refuses an INT8 model (errors.INT8_IS_PT)
        stats = save_cpz(model, path, force=force, graph=True, coder=coder)  # at the input shape of its metadata
        if stats["graph_note"]:
            warnings.warn(
                f"{path}: no graph stored ({stats['graph_note']}); loading it needs your "
                f"{param('arch', 'module:callable')}",
                CompressWarning,
                stacklevel=2,
            )
        return path
    return save_torch(model, path, force=force)  # per kind of model
