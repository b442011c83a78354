"""The .cpz container: one compact, checked file holding a compressed model.

Layout (all integers little-endian; see docs/format.md)::

    0   4  magic  b"CPZ\\0"
    4   2  version (1)
    6   2  flags (0)
    8   4  manifest length M (bytes, zlib-compressed JSON)
    12  4  CRC-32 of the manifest bytes
    16  M  manifest: {"arch": ..., "tensors": [...], "meta": ...}
    ..     tensor sections, in manifest order, each with its CRC-32 in the manifest
    -4  4  CRC-32 of every byte before it

Reading never trusts a declared length: sizes are checked against the file size and fixed limits
before anything is allocated, every CRC is verified before decoding, and the architecture is data
(``arch.py``), so decoding a stranger's file runs none of its code.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn as nn

from compress import kinds
from compress.budget import env_number
from compress.coding import streams
from compress.cpz import arch as arch_mod
from compress.cpz.tensors import decode_entry, encode_tensor, shape_numel
from compress.errors import FormatError, InputError, first_line, param, safe
from compress.filesystem import atomic_write
from compress.graph import capture as capture_mod
from compress.graph import model as graph_model
from compress.graph.program import GraphError
from compress.masks import remove_masks
from compress.meta import META_ATTR, get_meta, read_meta
from compress.quant_state import PARAMS, STATE_ATTRS, get_state, set_state

log = logging.getLogger(__name__)
MAGIC = b"CPZ\x00"
VERSION = 1
HEAD = struct.Struct("<4sHHII")
MAX_MANIFEST = 32 << 20  # decompressed JSON: a few hundred MB of Python objects at most
MAX_TENSORS = 20_000
# Decoding is bounded by what the file can honestly hold: at most MAX_RATIO times its size in
# decoded bytes (the densest legitimate coding, a very sparse layer's gap stream, stays far below),
# with a floor for small files. COMPRESS_MAX_DECODE_RATIO overrides it for a file you trust.
MAX_RATIO = 1000
MIN_DECODED_BYTES = 64 << 20


# ----------------------------------------------------------------------------- encoding
def _graph_of(model: nn.Module, graph: bool, input_shape) -> tuple[dict | None, str | None]:
    """(graph, None), or (None, why not) for a model of the user's classes; (None, None) for others."""
    doc = graph_model.stored(model)
    if doc is not None:
        return doc, None  # decoded from a graph: it is its own architecture
    if not graph or not arch_mod.foreign_classes(model):
        return None, None
    shape = input_shape or read_meta(model).input_shape
    if not shape:
        return None, f"its input shape is unknown (give {param('input_shape', (1, 'C', 'H', 'W'))})"
    try:
        return capture_mod.capture(model, shape), None
    except GraphError as e:
        return None, str(e)


def encode_model(model: nn.Module, graph: bool = False, input_shape=None, coder: str = "auto") -> tuple[bytes, dict]:
    """The .cpz bytes of a model, and per-tensor stats. ``graph``: for a model of the user's own
    classes, also store its graph (``graph.py``, captured by ``capture.py``), so that it decodes without their code;
    ``stats["graph_bytes"]`` is what it costs, ``stats["graph_note"]`` why there is none. ``coder``:
    ``auto`` (each stream in its smallest coding), ``huffman`` (no ANS coding: the bytes of
    compress before it) or ``context`` (ANS coding wherever it applies); see ``tensors.encode_tensor``."""
    try:
        streams.check_coder(coder)
    except ValueError as e:
        raise InputError(str(e)) from e
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("TorchScript models cannot be stored in a .cpz; pass the nn.Module")
    refused = kinds.refusal(model, kinds.CPZ)  # an INT8 model: packed INT8 kernels, not tensors
    if refused is not None:
        raise refused
    remove_masks(model)
    doc, note = _graph_of(model, graph, input_shape)
    try:
        spec = None if graph_model.stored(model) is not None else arch_mod.describe(model)
    except TypeError as e:
        raise InputError(str(e)) from e
    modules = dict(model.named_modules())
    entries, sections = [], []
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        mod_name, _, leaf = name.rpartition(".")
        if leaf in RESERVED:
            raise InputError(f"the model has a tensor named {name!r}, a name compress reserves; rename it")
        state = get_state(modules[mod_name], leaf) if leaf in PARAMS and mod_name in modules else None
        data, fields = encode_tensor(t, state, name, coder)
        entry = {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).replace("torch.", ""),
            "length": len(data),
            "crc": zlib.crc32(data),
            **fields,
        }  # sections follow each other
        entries.append(entry)
        sections.append(data)
    manifest = {"arch": spec, "tensors": entries, "format": "cpz", "version": VERSION}
    if doc is not None:
        manifest["graph"] = doc
    if spec is None:  # the metadata a module tree's root would carry
        manifest["meta"] = arch_mod.encode_value(get_meta(model), "metadata")
    try:
        mbytes = zlib.compress(json.dumps(manifest, separators=(",", ":"), allow_nan=False).encode(), 9)
    except ValueError as e:
        raise InputError(f"model metadata cannot be stored: {e}") from e
    body = HEAD.pack(MAGIC, VERSION, 0, len(mbytes), zlib.crc32(mbytes)) + mbytes + b"".join(sections)
    blob = body + struct.pack("<I", zlib.crc32(body))
    stats = {
        "file_bytes": len(blob),
        "manifest_bytes": len(mbytes),
        "tensors": entries,
        "graph_bytes": len(zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 9)) if doc else 0,
        "graph_note": note,
    }
    return blob, stats


def save_cpz(
    model: nn.Module, path, force: bool = False, graph: bool = True, input_shape=None, coder: str = "auto"
) -> dict:
    """Write ``model`` as a .cpz file atomically; returns per-tensor stats (``encode_model``)."""
    blob, stats = encode_model(model, graph=graph, input_shape=input_shape, coder=coder)
    with atomic_write(path, force) as tmp:
        Path(tmp).write_bytes(blob)
    return stats


# ----------------------------------------------------------------------------- decoding
def _fail(path, msg) -> NoReturn:
    raise FormatError(f"{path}: not a valid .cpz file ({msg})")


def read_manifest(blob: bytes, path="<bytes>") -> tuple[dict, int]:
    if len(blob) < HEAD.size + 4:
        _fail(path, "too short")
    magic, version, flags, mlen, mcrc = HEAD.unpack_from(blob, 0)
    if magic != MAGIC:
        _fail(path, "bad magic")
    if version != VERSION:
        _fail(path, f"unsupported version {version}; this compress reads version {VERSION}")
    if flags != 0:
        _fail(path, "unknown flags")
    if mlen > len(blob) - HEAD.size - 4 or mlen > MAX_MANIFEST:
        _fail(path, "manifest length beyond the file")
    (fcrc,) = struct.unpack_from("<I", blob, len(blob) - 4)
    if zlib.crc32(memoryview(blob)[:-4]) != fcrc:
        _fail(path, "file checksum mismatch: truncated or corrupted")
    mbytes = blob[HEAD.size : HEAD.size + mlen]
    if zlib.crc32(mbytes) != mcrc:
        _fail(path, "manifest checksum mismatch")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(mbytes, MAX_MANIFEST)
        if d.unconsumed_tail:
            _fail(path, "manifest too large")
        manifest = json.loads(raw)
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError):
        _fail(path, "unreadable manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list) or "arch" not in manifest:
        _fail(path, "malformed manifest")
    if len(manifest["tensors"]) > MAX_TENSORS:
        _fail(path, "too many tensors")
    return manifest, HEAD.size + mlen


def decode_budget(file_bytes: int, max_ratio: float | None = None) -> streams.Budget:
    """What decoding a file of ``file_bytes`` may spend (see MAX_RATIO)."""

    ratio = max_ratio if max_ratio is not None else env_number("COMPRESS_MAX_DECODE_RATIO", MAX_RATIO)
    decoded_bytes = max(MIN_DECODED_BYTES, int(ratio * file_bytes))
    # work: 128 units (~1.3 us) per byte of file, at least 2^26 (~0.7 s); real files need far less
    return streams.Budget(elements=decoded_bytes // 4, work=max(1 << 26, int(ratio / MAX_RATIO * 128 * file_bytes)))


# Names a file's tensors may not take: the attributes compress keeps on modules (a buffer named
# ``compress_meta`` would stand where the metadata belongs).
RESERVED = frozenset((META_ATTR,) + STATE_ATTRS)


def arch_hint() -> str:
    """How to pass the user's own code that builds a model (never a path the file names)."""
    return f"{param('arch', 'module:callable')} (your own code that builds it)"


def _over_budget(path, err, size: int):
    raise FormatError(
        f"{path}: refused: {err} (more than {MAX_RATIO}x its {size:,} bytes). If you "
        "trust it, set COMPRESS_MAX_DECODE_RATIO to a larger ratio"
    ) from None


def _charge(manifest: dict, budget: streams.Budget, path, size: int) -> None:
    """Charge every tensor the manifest declares (its elements, and a fixed cost per entry) before
    anything is decoded: a file that asks for too much is refused at once, not after minutes."""
    for e in manifest["tensors"]:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not 0 < len(e["name"]) <= 400:
            _fail(path, "malformed tensor entry")
        if e["name"].rpartition(".")[2] in RESERVED:
            _fail(path, f"tensor {safe(e['name'])} takes a name compress reserves")
        try:
            _, n = shape_numel(e)
            budget.spend(elements=n, work=1024 + n)
        except streams.BudgetExceeded as err:
            _over_budget(path, err, size)
        except ValueError as err:
            _fail(path, f"tensor {safe(e['name'])}: {err}")


def decode_model(
    blob: bytes, path="<bytes>", budget: streams.Budget | None = None, base: Callable[[], nn.Module] | None = None
) -> nn.Module:
    """Decode .cpz bytes. ``base`` builds the user's own model (their ``--arch``) when the
    architecture refers to classes of their code; it is called only then."""
    manifest, start = read_manifest(blob, path)
    budget = budget or decode_budget(len(blob))
    _charge(manifest, budget, path, len(blob))  # the whole file's cost, before any section is decoded
    end = len(blob) - 4
    tensors, states = {}, {}
    expected_off = 0
    for e in manifest["tensors"]:
        name = e["name"]  # checked by _charge
        if name in tensors:
            _fail(path, f"tensor {safe(name)} appears twice")
        off, ln, crc = e.get("offset", expected_off), e.get("length"), e.get("crc")  # offset: older writers
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (off, ln, crc))
            or start + off + ln > end
        ):
            _fail(path, f"section of {safe(name)} lies outside the file")
        if off != expected_off:  # sections follow each other: none overlaps or is read twice
            _fail(path, f"section of {safe(name)} does not follow the previous one (overlapping sections)")
        expected_off = off + ln
        data = memoryview(blob)[start + off : start + off + ln]  # a view: slices of it copy nothing
        if zlib.crc32(data) != crc:
            _fail(path, f"checksum mismatch in {safe(name)}")
        try:
            tensors[name], state = decode_entry(e, data, budget)
        except streams.BudgetExceeded as err:
            _over_budget(path, err, len(blob))
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as err:
            _fail(path, f"tensor {safe(name)}: {safe(first_line(err, 100))}")
        if state is not None:
            states[name] = state
    if start + expected_off != end:
        _fail(path, "bytes between the last section and the checksum")
    model = _architecture(manifest, tensors, base, path)
    mods = dict(model.named_modules())
    for name, state in states.items():
        mod_name, _, leaf = name.rpartition(".")
        if leaf not in PARAMS or mod_name not in mods:
            _fail(path, f"coded tensor {safe(name)} is not the weight or bias of a layer in the architecture")
        set_state(mods[mod_name], state, leaf)
    model.eval()
    return model


def _architecture(manifest: dict, tensors: dict, base, path) -> nn.Module:
    """The module the manifest describes: rebuilt from data, from the user's code (``base``) where it
    refers to their classes, or else from its stored graph."""
    spec, graph = manifest["arch"], manifest.get("graph")
    refs = arch_mod.references(spec)
    if spec is None or (refs and base is None and graph is not None):
        if graph is None:
            _fail(path, "no architecture")
        try:
            model = graph_model.rebuild(graph, tensors)
        except GraphError as err:
            hint = f"; pass {arch_hint()} to rebuild it from your code" if refs else ""
            raise InputError(f"{path}: its stored graph will not be run: it {err}{hint}") from None
        meta = spec.get("attrs", {}).get("compress_meta") if isinstance(spec, dict) else manifest.get("meta")
        try:
            meta = arch_mod.decode_value(meta) if meta is not None else {}
        except ValueError:
            _fail(path, "malformed metadata")
        # as the file has it (keys of another compress included); read_meta checks every value when it is read
        setattr(model, META_ATTR, {str(k): v for k, v in meta.items()} if isinstance(meta, dict) else {})
        return model
    if refs and base is None:
        raise InputError(
            f"{path}: {arch_mod.NeedsArch(refs)}; pass {arch_hint()} to rebuild it "
            "(the file stores its structure and weights as data, not the code)"
        )
    try:
        return arch_mod.rebuild(spec, tensors, base=base() if refs else None)
    except arch_mod.ArchMismatch as err:
        raise InputError(f"{path}: {err}; pass the {arch_hint()} that the file was written with") from None
    except (ValueError, TypeError, KeyError, RecursionError) as err:
        _fail(path, f"architecture: {safe(first_line(err, 100), 100)}")


def load_cpz(path, base: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Decode a .cpz file into a runnable module (no code from the file runs; ``base``: see
    ``decode_model``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size > 16 << 30:
        _fail(path, "file too large")
    return decode_model(path.read_bytes(), path, base=base)
