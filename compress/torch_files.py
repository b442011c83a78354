"""Safe loading and saving of models.

Models are code: a whole pickled module runs code when it is unpickled, and a TorchScript archive
is a program. ``load_model`` therefore accepts, without being told to trust anything:

* state_dicts (loaded with ``weights_only=True``) together with ``arch="module:callable"``;
* whole pickled modules whose every class is a ``torch.nn`` or ``compress.models`` module
  (allow-listed and loaded with ``weights_only=True``): this covers every model compress writes.

Anything else -- TorchScript included -- needs ``trust_pickle=True`` (``--trust-pickle``). ``compress.model_io``
dispatches
between these files and .cpz containers.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import os
import pickle
import pickletools
import sys
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from compress.budget import env_number
from compress.cpz.arch import MOVED, OWN_MODULES, foreign_classes
from compress.cpz.container import encode_model
from compress.errors import InputError, UntrustedPickleError, UsageError, first_line, param, safe
from compress.filesystem import atomic_write
from compress.graph.model import GraphModel
from compress.masks import remove_masks
from compress.meta import set_meta
from compress.models import create_model
from compress.user_code import resolve_callable

log = logging.getLogger(__name__)

# Non-module globals that a checkpoint of ours may hold and that build nothing dangerous.
_EXTRA_SAFE = {
    "collections.OrderedDict",
    "builtins.set",
    "torch.nn.parameter.Parameter",
    "compress.quant_state.QuantState",
}


# ----------------------------------------------------------------------------- arch specs
def build_arch(arch: str, **kw) -> nn.Module:
    """Build a model from ``module:callable``, a file, or a zoo name (``zoo:lenet5``)."""
    if arch.startswith("zoo:"):
        return create_model(arch[4:], **kw)
    fn = resolve_callable(arch)
    try:
        model = fn(**kw) if kw else fn()
    except Exception as e:
        raise InputError(f"{param('arch', arch)}: calling it failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"{param('arch', arch)} returned {type(model).__name__}, not an nn.Module")
    return model


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: str = "") -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    where = f" ({param('arch', arch)})" if arch else ""
    if missing:
        raise InputError(
            f"weights do not match the architecture{where}: missing key {missing[0]!r} ({len(missing)} missing)"
        )
    if unexpected:
        raise InputError(
            f"weights do not match the architecture{where}: unexpected key {unexpected[0]!r}"
            f" ({len(unexpected)} unexpected)"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise InputError(
                f"weights do not match the architecture{where}: {k!r} has shape "
                f"{tuple(sd[k].shape)} in the file but {tuple(v.shape)} in the model"
            )
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- loading
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


# Modules whose nn.Module classes a safe load may name. torch.nn's are resolved only if already
# imported (resolving a name never imports a module, whose import could run code); compress's own
# are the ones compress writes.
_OWN_MODULES = OWN_MODULES + ("compress.quant_state",)


def _allowed_global(name: str):
    """The object for an allow-listed global, or None. Imports nothing a file names."""
    name = MOVED.get(name, name)
    module, _, attr = name.rpartition(".")
    if "__main__" in module.split(".") or attr.startswith("_"):
        return None
    if module.startswith("torch.nn.") or name in _EXTRA_SAFE:
        mod = sys.modules.get(module)
    elif any(module == m or module.startswith(m + ".") for m in _OWN_MODULES):
        try:
            mod = importlib.import_module(module)  # our own code
        except ImportError:
            return None
    else:
        return None
    obj = getattr(mod, attr, None) if mod is not None else None
    if obj is not None and (name in _EXTRA_SAFE or (isinstance(obj, type) and issubclass(obj, nn.Module))):
        return obj
    return None


class _NoConstructors:
    """While a file loads, no nn.Module constructor may run: a checkpoint that torch.save wrote
    rebuilds modules with ``__new__`` and ``__setstate__`` only; a file that calls a constructor with
    arguments of its own choosing (``Linear(45000, 45000)``: 8 GB) is refused before it allocates."""

    _local = threading.local()
    _orig = None

    def __enter__(self):
        if _NoConstructors._orig is None:
            _NoConstructors._orig = nn.Module.__init__
            orig = _NoConstructors._orig

            def guarded(module, *args, **kw):
                if getattr(_NoConstructors._local, "active", False):
                    raise _Refused(
                        f"the file calls the constructor of {type(module).__name__} with arguments of its own"
                    )
                orig(module, *args, **kw)

            nn.Module.__init__ = guarded
        self._local.active = True
        return self

    def __exit__(self, *exc):
        self._local.active = False


class _Refused(Exception):
    pass


MAX_UNPACK_RATIO = 16  # torch.save stores its records uncompressed: what a real file unpacks to is its size
MIN_UNPACK_BYTES = 64 << 20


def _check_unpacked_size(path: Path) -> None:
    """Refuse a torch (zip) file whose records unpack to far more than the file's size, from the sizes its
    directory declares, before torch allocates them (a deflated 2 GB tensor fits in 2 MB)."""
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive: torch's legacy format reads each tensor's bytes from the file itself
    size = path.stat().st_size
    ratio = env_number("COMPRESS_MAX_DECODE_RATIO", MAX_UNPACK_RATIO)
    if total > max(MIN_UNPACK_BYTES, ratio * size):
        raise InputError(
            f"{path}: refused: its records unpack to {total:,} bytes from a file of {size:,} "
            "(torch.save writes them uncompressed). If you trust it, set COMPRESS_MAX_DECODE_RATIO "
            "to a larger ratio"
        )


MAX_PICKLE_OPS = 2_000_000  # ResNet-56 pickled whole: 30,478; an INT8 file of LeNet-5: 540


def _check_pickle_ops(path: Path) -> None:
    """Refuse a torch (zip) file whose pickle holds more than MAX_PICKLE_OPS opcodes, counted (and the count
    stopped there) before torch reads it: torch's weights-only unpickler spends ~4 us and ~100 bytes of Python
    objects on each (a 40 MB pickle of a million small lists: 50 s and 1.4 GB), while a model's numbers are
    tensor records that cost nothing there."""
    limit = int(env_number("COMPRESS_MAX_PICKLE_OPS", MAX_PICKLE_OPS))
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if name is None:
                return
            data = io.BytesIO(z.read(name))  # its size is bounded by _check_unpacked_size
        n = 0
        for _ in pickletools.genops(data):
            n += 1
            if n > limit:
                raise InputError(
                    f"{path}: refused: its pickle holds more than {limit:,} records for torch to unpickle one by "
                    "one. If you trust it, set COMPRESS_MAX_PICKLE_OPS to a larger number"
                )
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable pickle in a zip: torch's own reader says what is wrong with it


def _torch_load(path: Path, trust_pickle: bool):
    from torch.serialization import get_unsafe_globals_in_checkpoint

    _check_unpacked_size(path)
    if not trust_pickle:
        _check_pickle_ops(path)
    try:
        needed = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:
        raise InputError(f"{path} is not a PyTorch file ({type(e).__name__}: {first_line(e, 120)})") from e
    allowed = {n: _allowed_global(n) for n in needed}
    foreign = sorted(n for n, o in allowed.items() if o is None)
    if foreign and not trust_pickle:
        raise UntrustedPickleError(
            f"{path} is a pickle that would run code from {foreign[0]!r}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}; it was not loaded. "
            f"If you trust this file pass {param('trust_pickle')}, or save a state_dict "
            f"and load it with {param('arch', 'module:callable')}"
        )
    try:
        if foreign:  # trusted by the user
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(list(allowed.values())), _NoConstructors():
            return torch.load(path, map_location="cpu", weights_only=True)
    except _Refused as e:
        raise UntrustedPickleError(
            f"{path}: {e}; it was not loaded. If you trust this file pass {param('trust_pickle')}"
        ) from None
    except ModuleNotFoundError as e:  # a trusted whole pickle of classes Python cannot import from here
        raise InputError(
            f"{path}: the pickled model needs the module {e.name!r}, which Python cannot import "
            "here; run compress where it is importable (PYTHONPATH=the folder that holds it), or "
            f"save a state_dict and pass {param('arch', 'path/to/file.py:build')}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        ImportError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
        MemoryError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise InputError(f"{path} could not be loaded as a model: {first_line(e, 160)}") from e


CPZ_KEY = "compress_cpz"


def load_torch(
    path: Path,
    arch: str | None = None,
    trust_pickle: bool = False,
    cpz: Callable[[bytes], nn.Module] | None = None,
    int8: Callable | None = None,
) -> nn.Module:
    """Load a torch file (TorchScript, state_dict + arch, or a whole module) safely. ``cpz`` decodes
    the container bytes of a file compress wrote for a model of the user's own classes."""
    if _is_torchscript(path):
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a TorchScript archive, and TorchScript is code: loading it runs its methods "
                "(__setstate__, forward), which can read and write files. It was not loaded. If you trust "
                f"this file pass {param('trust_pickle')}, or save a state_dict and load it with "
                f"{param('arch', 'module:callable')}"
            )
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # TorchScript's loader raises many kinds; all mean a broken archive
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            cause = next(
                (ln for ln in reversed(lines) if not ln.startswith(("File ", "~", "^", "Serialized"))), type(e).__name__
            )
            raise InputError(f"{path}: TorchScript archive could not be loaded ({cause[:200]})") from e
        model.eval()
        return model
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get(CPZ_KEY), bytes) and cpz is not None:
        return _unwrap(path, obj, cpz, int8)
    if arch is not None:
        sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{path} holds no state_dict to load into {param('arch', arch)}")
        model = build_arch(arch)
        load_state_dict_strict(model, sd, arch)
        set_meta(model, arch_ref=arch)  # files written from it name the --arch that rebuilds them
    elif isinstance(obj, nn.Module):
        model = obj
    elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        raise UsageError(
            f"{path} is a state_dict without its architecture; pass {param('arch', 'module:callable')} "
            "(or zoo:NAME for a zoo model)"
        )
    else:
        raise InputError(f"{path} holds a {type(obj).__name__}, not a model")
    model.eval()
    return model


INT8_KEYS = ("compress_int8", "int8_state")  # an INT8 model's file: its table and INT8 state beside the float .cpz


def _unwrap(path: Path, obj: Mapping, cpz: Callable[[bytes], nn.Module], int8: Callable | None = None) -> nn.Module:
    """The model of a wrapped .cpz: its one source of truth. A file of an older compress also holds a
    state_dict; it must agree with the container, or the file is refused (other tools read one, compress
    the other). An INT8 file also holds ``INT8_KEYS``: ``int8(float_model, table, state, cpz_bytes)`` rebuilds
    it."""
    extra = set(obj) - {CPZ_KEY, "state_dict", *INT8_KEYS}
    if extra:
        raise InputError(f"{path}: a wrapped .cpz with other entries ({safe(sorted(map(str, extra))[0])}); refused")
    model = cpz(obj[CPZ_KEY])
    if any(k in obj for k in INT8_KEYS):
        if int8 is None or not all(k in obj for k in INT8_KEYS):
            raise InputError(f"{path}: an INT8 file without its INT8 table or state; refused")
        return int8(model, obj[INT8_KEYS[0]], obj[INT8_KEYS[1]], obj[CPZ_KEY])
    sd = obj.get("state_dict")
    if sd is not None:
        own = model.state_dict()
        if (
            not isinstance(sd, Mapping)
            or set(sd) != set(own)
            or not all(
                isinstance(sd[k], torch.Tensor) and sd[k].shape == v.shape and torch.equal(sd[k], v)
                for k, v in own.items()
            )
        ):
            raise InputError(
                f"{path}: its state_dict and the .cpz it wraps disagree; refused (write the file again with compress)"
            )
    return model


def save_wrapped(blob: bytes, path: str | os.PathLike, force: bool = False, extra: dict | None = None) -> Path:
    """A torch file of plain data, ``{"compress_cpz": the model's .cpz bytes}`` (atomically): the
    weights once, readable by ``torch.load(weights_only=True)`` and by compress without trust.
    ``extra``: the INT8 table and state of an INT8 model (``INT8_KEYS``), tensors and plain values."""
    path = Path(path)
    with atomic_write(path, force) as tmp, open(tmp, "wb") as f:
        torch.save(_wrapped(blob, extra), f)  # a file object: the archive's inner names do not depend on the path's
    return path


def wrapped_size(blob: bytes, extra: dict | None = None) -> int:
    """The bytes ``save_wrapped`` writes for the same content."""
    buf = io.BytesIO()
    torch.save(_wrapped(blob, extra), buf)
    return buf.tell()


def _wrapped(blob: bytes, extra: dict | None) -> dict:
    return {CPZ_KEY: blob, **(extra or {})}


@functools.singledispatch
def save_torch(model: nn.Module, path: str | os.PathLike, force: bool = False) -> Path:
    """Save a model as a torch file compress loads again without trust; a kind of model stored otherwise
    registers its own writer (an INT8 model: ``quantize.int8_file``)."""
    if foreign_classes(model):
        return _save_cpz_wrapped(model, path, force)
    return save_module(model, path, force=force)


@save_torch.register(GraphModel)
def _save_cpz_wrapped(model: nn.Module, path: str | os.PathLike, force: bool = False) -> Path:
    # classes of the user's code are not pickled (reloading them would need trust), nor is a model decoded from
    # its graph: the file is {"compress_cpz": the .cpz bytes}, which torch.load(weights_only=True) reads, and
    # compress decodes (with the same --arch)
    blob, _ = encode_model(model)  # a graph-decoded model keeps its graph
    return save_wrapped(blob, path, force=force)


def save_module(model: nn.Module, path: str | os.PathLike, force: bool = False) -> Path:
    """Save a whole module (architecture travels with the weights), atomically.

    ``torch.load(path, weights_only=False)`` returns a runnable module; compress reloads it without
    ``--trust-pickle`` since every class in it is a torch.nn / compress module.
    """
    remove_masks(model)  # masks are training state: finalize to exact zeros first
    path = Path(path)
    with atomic_write(path, force) as tmp:
        torch.save(model, tmp)
    return path
