"""How compress opens and decodes the data files a user names, bounded by construction.

* Only regular files are opened: a FIFO, device or socket (``x.png`` may be one) is refused from
  ``stat`` before it is opened, and again from ``fstat`` after an open that cannot block (``O_NONBLOCK``),
  so a file swapped in between cannot hang the command.
* A file found inside a data folder stays inside it: a link that leads out of the folder, loops, or
  leads nowhere is refused (``inside``).
* A compressed file (an IDX ``.gz``, a deflated ``.npz`` member) decodes to at most ``MAX_DECODE_RATIO``
  times its size (``MIN_DECODED_BYTES`` at least): the size it declares is charged to a ``DecodeBudget``
  before anything is decoded, and ``read_exact`` then reads in chunks that stop at that size, whatever
  the container's own headers claim.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np

from compress.budget import env_number
from compress.errors import InputError, safe

MAX_ARRAY_BYTES = 8 << 30  # one array of a data file, decoded
# images gzip about 5:1 (MNIST); a 1000:1 gzip is a run of one byte, not a data set. The IDX .gz and the
# .npz readers share it; COMPRESS_MAX_DECODE_RATIO overrides it for a file the user trusts.
MAX_DECODE_RATIO = 100
MIN_DECODED_BYTES = 64 << 20  # the floor for small files
CHUNK = 1 << 24  # bytes read (and decompressed) at a time


def decode_ratio() -> float:
    return env_number("COMPRESS_MAX_DECODE_RATIO", MAX_DECODE_RATIO)


def decode_cap(compressed_bytes: int) -> int:
    """The most bytes that ``compressed_bytes`` of compressed data may decode to."""
    return max(MIN_DECODED_BYTES, int(decode_ratio() * compressed_bytes))


class DecodeBudget:
    """What the compressed parts of one file may decode to, all together: ``decode_cap`` of the file's size.
    Each part charges its declared size before it is decoded, and that size must also fit ``decode_cap``
    of the part's own compressed bytes (one member may not be a bomb by ratio in a file of honest ones)."""

    def __init__(self, path, file_bytes: int):
        self.path, self.file_bytes = path, file_bytes
        self.left = self.cap = decode_cap(file_bytes)

    def charge(self, what: str, declared: int, compressed_bytes: int | None = None, held: int | None = None) -> None:
        """Charge a part that declares ``declared`` bytes and is ``held`` in memory (float32 of uint8: 4x)."""
        n = declared if held is None else max(held, declared)
        size = f"{declared:,} bytes" + (f" ({n:,} as float32)" if n > declared else "")
        own = None if compressed_bytes is None else decode_cap(compressed_bytes)
        if own is not None and n > own:
            self._refuse(f"{what} declares {size} from {compressed_bytes:,} compressed", own)
        if n > self.left:
            spent = f" ({self.cap - self.left:,} already decoded)" if self.left < self.cap else ""
            self._refuse(f"{what} declares {size}{spent} from a file of {self.file_bytes:,}", self.cap)
        self.left -= n

    def _refuse(self, why: str, cap: int):
        raise InputError(
            f"{self.path}: refused: {why}, more than {decode_ratio():g}x (at most {cap:,} bytes). If "
            "you trust it, set COMPRESS_MAX_DECODE_RATIO to a larger ratio"
        )


def read_exact(f: IO[bytes], n: int, where: str) -> np.ndarray:
    """Exactly ``n`` bytes of ``f`` (uint8), read in chunks; refused if ``f`` holds fewer or more. ``n`` must
    already be checked (``DecodeBudget``, or the file's own size): this never reads past ``n + 1``."""
    buf = np.empty(n, np.uint8)
    view, got = buf.data, 0
    while got < n:
        k = f.readinto(view[got : got + min(CHUNK, n - got)])  # type: ignore[attr-defined]
        if not k:
            raise InputError(f"{where}: truncated: {got:,} bytes of data where its header declares {n:,}")
        got += k
    if f.read(1):
        raise InputError(f"{where}: holds more data than its header declares ({n:,} bytes)")
    return buf


# ----------------------------------------------------------------------------- files and folders
def inside(path, root) -> Path:
    """The real path of ``path``, found in the data folder ``root``: refused when a link on the way loops,
    leads nowhere or leads out of the folder."""
    try:
        top = os.path.realpath(root, strict=True)
        real = os.path.realpath(path, strict=True)
    except OSError as e:  # ELOOP, or a link to nothing
        raise InputError(f"{safe(str(path), 200)}: a link that loops or leads nowhere ({e.strerror or e})") from None
    if os.path.commonpath([top, real]) != top:
        raise InputError(
            f"{safe(str(path), 200)} is a link that leads out of its folder {safe(str(root), 200)} (to "
            f"{safe(real, 200)}); copy the file into the folder instead"
        )
    return Path(real)
