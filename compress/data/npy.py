"""NumPy files, read by compress: ``.npy`` headers parsed and checked field by field, ``.npz`` archives read
member by member within a budget.

What a file may ask for:

* a ``.npy`` header: at most ``MAX_HEADER`` bytes, a literal dict of exactly ``descr`` (a plain number type:
  bool, int, uint or float of 1 to 8 bytes; never an object, which would be a pickle), ``fortran_order``
  (a bool) and ``shape`` (at most ``MAX_RANK`` non-negative ints, ``MAX_ARRAY_BYTES`` of data at most);
  its data must be exactly the bytes the shape declares, no fewer and no more;
* an ``.npz``: a zip whose central directory is at most ``MAX_DIRECTORY`` bytes and ``MAX_MEMBERS`` members,
  each a plain, unique name; members stored (``np.savez``) or deflated (``np.savez_compressed``), nothing
  else, never encrypted; a deflated member decodes to what its header declares, charged to the file's
  ``DecodeBudget`` before it is decoded. Only stored members are memory-mapped (their bytes are the file's).
"""

from __future__ import annotations

import ast
import math
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from compress.data.files import MAX_ARRAY_BYTES, DecodeBudget, inside, read_exact
from compress.errors import InputError, first_line, safe
from compress.filesystem import open_regular

MAX_HEADER = 10_000  # bytes of a .npy header's dict (numpy's own limit; its headers are ~120 bytes)
MAX_RANK = 8
MAX_MEMBERS = 64  # np.savez writes one member per array; x and y are read
MAX_DIRECTORY = 1 << 20  # bytes of an .npz's central directory (the list of members parsed whole when opened)
_DESCR = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    size: int  # bytes of the header itself: the data start after them

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def array(self, data: np.ndarray) -> np.ndarray:
        """``data`` (uint8, exactly ``nbytes``) as the array this header declares."""
        return data.view(self.dtype).reshape(self.shape, order="F" if self.fortran else "C")


def read_npy_header(f: IO[bytes], where: str) -> NpyHeader:
    """The header of the .npy at ``f``'s position, checked; ``f`` is left at the array's data."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise InputError(f"{where}: not a .npy array (no NumPy header)")
    major = magic[6]
    if major not in (1, 2, 3):
        raise InputError(f"{where}: .npy format {major}.{magic[7]}; 1.0 to 3.0 expected")
    width = 2 if major == 1 else 4
    raw = f.read(width)
    if len(raw) < width:
        raise InputError(f"{where}: truncated .npy header")
    hlen = int.from_bytes(raw, "little")
    if hlen > MAX_HEADER:
        raise InputError(f"{where}: its .npy header declares {hlen:,} bytes (at most {MAX_HEADER:,})")
    text = f.read(hlen)
    if len(text) < hlen:
        raise InputError(f"{where}: truncated .npy header")
    shape, dtype, fortran = parse_npy_dict(text, "utf-8" if major == 3 else "latin-1", where)
    return NpyHeader(shape, dtype, fortran, 8 + width + hlen)


def parse_npy_dict(text: bytes, encoding: str, where: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """``{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}``, each field checked before use."""
    try:
        d = ast.literal_eval(text.decode(encoding))  # literals only: no name, call or attribute is evaluated
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: malformed .npy header ({type(e).__name__})") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise InputError(f"{where}: malformed .npy header (a dict of descr, fortran_order and shape expected)")
    descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
    if not (isinstance(descr, str) and _DESCR.fullmatch(descr)):
        raise InputError(
            f"{where}: array of dtype {safe(descr)}; plain numbers expected (bool, int, uint, float; "
            "never objects, which numpy stores as a pickle)"
        )
    if not isinstance(fortran, bool):
        raise InputError(f"{where}: malformed .npy header (fortran_order {safe(fortran)})")
    if not (
        isinstance(shape, tuple) and len(shape) <= MAX_RANK and all(type(n) is int and 0 <= n < 1 << 62 for n in shape)
    ):
        raise InputError(f"{where}: malformed .npy header (shape {safe(shape)}: at most {MAX_RANK} sizes >= 0)")
    dtype = np.dtype(descr)
    nbytes = math.prod(shape) * dtype.itemsize  # exact integers: no overflow
    if nbytes > MAX_ARRAY_BYTES:
        raise InputError(
            f"{where}: array declares shape {list(shape)} ({nbytes:,} bytes), more than compress "
            f"loads ({MAX_ARRAY_BYTES >> 30} GiB)"
        )
    return shape, dtype, fortran


def _mapped(f: IO[bytes], h: NpyHeader, offset: int) -> np.ndarray:
    if h.nbytes == 0:
        return np.zeros(h.shape, h.dtype)
    return np.memmap(f, dtype=h.dtype, mode="r", offset=offset, shape=h.shape, order="F" if h.fortran else "C")


# ----------------------------------------------------------------------------- a folder of x.npy + y.npy
def read_npy(path: Path, root: Path, mmap_min: int) -> np.ndarray:
    """``root/NAME.npy``: memory-mapped when it holds ``mmap_min`` bytes or more, else read and checked whole."""
    where = str(path)
    with open_regular(inside(path, root)) as f:
        size = os.fstat(f.fileno()).st_size
        h = read_npy_header(f, where)
        if size != h.size + h.nbytes:
            raise InputError(
                f"{where}: its header declares shape {list(h.shape)} ({h.nbytes:,} bytes) but the "
                f"file holds {size - h.size:,} bytes of data"
            )
        if h.nbytes >= mmap_min:
            return _mapped(f, h, h.size)
        return h.array(read_exact(f, h.nbytes, where))


# ----------------------------------------------------------------------------- .npz
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


def _directory_bytes(f: IO[bytes], size: int, where: str) -> int:
    """The size of the zip's central directory, found as ``zipfile`` finds it (its end record at the end
    of the file, or before a comment; a zip64 record before that), read before ``zipfile`` parses it whole."""
    tail = min(size, _END.size + 0xFFFF)
    f.seek(size - tail)
    data = f.read(tail)
    at = len(data) - _END.size
    if not (at >= 0 and data[at : at + 4] == b"PK\x05\x06" and data[-2:] == b"\0\0"):
        at = data.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(data):
        raise InputError(f"{where}: not a readable .npz file (no zip directory)")
    end = _END.unpack_from(data, at)
    sizes = [end[5]]
    if at >= _END64_LOCATOR.size:
        loc = _END64_LOCATOR.unpack_from(data, at - _END64_LOCATOR.size)
        if loc[0] == b"PK\x06\x07":  # a zip64 record: just before the locator, or where the locator says
            before = at - _END64_LOCATOR.size - _END64.size
            records = [data[before : before + _END64.size]] if before >= 0 else []
            if loc[2] <= size - _END64.size:
                f.seek(loc[2])
                records.append(f.read(_END64.size))
            sizes += [_END64.unpack(r)[8] for r in records if len(r) == _END64.size and r[:4] == b"PK\x06\x06"]
    return max(sizes)


def _check_names(infos: list[zipfile.ZipInfo], where: str) -> None:
    seen = set()
    for i in infos:
        name = i.filename
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or ".." in parts
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
        ):
            raise InputError(f"{where}: a member named {safe(name, 80)}; the members of an .npz are plain names")
        if name in seen:
            raise InputError(f"{where}: two members named {safe(name, 80)}")
        seen.add(name)


def _member(
    f: IO[bytes], z: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, budget: DecodeBudget, mmap_min: int, where: str
) -> np.ndarray:
    """One array of the archive: its .npy header first, then exactly the bytes it declares."""
    if info.flag_bits & 0x1:
        raise InputError(f"{where}: it is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(
            f"{where}: compressed with method {info.compress_type}; np.savez stores and "
            "np.savez_compressed deflates, nothing else is read"
        )
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise InputError(f"{where}: corrupt zip entry")
    start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
    if start + info.compress_size > size:
        raise InputError(f"{where}: its zip entry runs past the end of the file")
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.compress_size != info.file_size:
        raise InputError(f"{where}: a stored zip entry of {info.compress_size:,} bytes declares {info.file_size:,}")
    with z.open(info) as s:  # checks the entry's local name; the data are not read yet
        h = read_npy_header(s, where)
        if info.file_size != h.size + h.nbytes:
            raise InputError(
                f"{where}: its header declares shape {list(h.shape)} ({h.nbytes:,} bytes) but its "
                f"zip entry holds {info.file_size - h.size:,} bytes of data"
            )
        if stored and h.nbytes >= mmap_min:
            return _mapped(f, h, start + h.size)
        if not stored:  # charged as it will be held: as float32 (4 bytes a value) when its values are smaller
            held = math.prod(h.shape) * max(h.dtype.itemsize, 4)
            budget.charge(f"member {info.filename!r}", h.nbytes, info.compress_size, held)
        return h.array(read_exact(s, h.nbytes, where))


def read_npz(path: Path, mmap_min: int, keys: tuple[str, ...] = ("x", "y")) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of the .npz at ``path``; stored ones of ``mmap_min`` bytes or more memory-mapped."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            directory = _directory_bytes(f, size, str(path))
            if directory > MAX_DIRECTORY:
                raise InputError(
                    f"{path}: its zip directory declares {directory:,} bytes (at most "
                    f"{MAX_DIRECTORY:,}: an .npz lists a few arrays)"
                )
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise InputError(
                        f"{path}: {len(infos):,} members (at most {MAX_MEMBERS}: an .npz of x and y holds two)"
                    )
                _check_names(infos, str(path))
                by_name = {i.filename: i for i in infos}
                found = [n[:-4] for n in by_name if n.endswith(".npy")]
                missing = [k for k in keys if f"{k}.npy" not in by_name]
                if missing:
                    raise InputError(
                        f"{path}: needs arrays 'x' and 'y' (found "
                        f"{', '.join(safe(n, 40) for n in found[:10]) or 'none'})"
                    )
                budget = DecodeBudget(path, size)
                return {
                    k: _member(f, z, by_name[f"{k}.npy"], size, budget, mmap_min, f"{path}: array {k!r}") for k in keys
                }
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            NotImplementedError,
            RuntimeError,
            struct.error,
        ) as e:
            raise InputError(f"{path}: not a readable .npz file ({first_line(e, 100)})") from None
