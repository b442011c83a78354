"""The kinds of data compress reads, and ``as_data``, which turns what users have into one of them: tensors in
memory (``TensorData``), memory-mapped arrays (``ArrayData``), a map-style ``Dataset`` (``MapData``), an
iterable ``Dataset`` or ``DataLoader`` (``IterData``). Each is a ``core.Data``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from compress import distributed
from compress.data.core import VAL_FRACTION, Batch, Data
from compress.errors import CompressError, InputError, first_line


class TensorData(Data):
    """Tensors in memory: ``x`` (N, ...) float32 inputs, ``y`` (N, ...) targets (class labels: int64)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str = "data"):
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices, train: bool = False) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]

    def labels(self) -> torch.Tensor | None:
        return self.y if self.y.dim() == 1 and not self.y.is_floating_point() else None

    def subset(self, indices, name: str | None = None) -> TensorData:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorData(self.x[idx], self.y[idx], name or self.name)

    def head(self, n: int) -> torch.Tensor:
        return self.x[:n]


class ArrayData(Data):
    """NumPy arrays, typically memory-mapped (``np.load(..., mmap_mode="r")``): a batch reads only its rows.
    ``x`` float (used as is) or uint8 (scaled to [0, 1]); ``y`` integer labels or float targets."""

    def __init__(self, x: np.ndarray, y: np.ndarray, name: str = "data"):
        self.x, self.y, self.name = x, y, name
        self._labels = (
            torch.from_numpy(np.asarray(y).astype(np.int64)) if y.dtype.kind in "iu" and y.ndim == 1 else None
        )

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices, train: bool = False) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        a = np.asarray(self.x[idx])
        x = torch.from_numpy(a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32, copy=False))
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        if bad.any():  # checked as read: a whole pass over a memory-mapped file up front would read it all
            raise InputError(f"data {self.name}: sample {int(idx[int(bad.nonzero()[0])])} holds NaN or infinite values")
        if x.dim() == 3:
            x = x[:, None]
        y = torch.from_numpy(np.asarray(self.y[idx]))
        return x, (y.long() if self._labels is not None else y.float())

    def labels(self) -> torch.Tensor | None:
        return self._labels

    def __getstate__(self):
        """A memory-mapped ``x`` travels as its file, offset and layout (a loader process started by spawning
        maps the file again instead of receiving a copy of the whole array)."""
        state = dict(self.__dict__)
        x = self.x
        if isinstance(x, np.memmap) and x.filename is not None:
            state["x"] = (
                "memmap",
                x.filename,
                x.dtype.str,
                x.shape,
                x.offset,
                "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C",
            )
        return state

    def __setstate__(self, state):
        x = state["x"]
        if isinstance(x, tuple) and x and x[0] == "memmap":
            _, filename, dtype, shape, offset, order = x
            state["x"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)
        self.__dict__.update(state)


def pil_to_tensor(img) -> torch.Tensor:
    """A PIL image as a float C x H x W tensor in [0, 1]."""
    a = np.asarray(img)
    if a.dtype == np.uint16 or a.dtype == np.int32:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_:
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32) / 255.0
    t = torch.from_numpy(a)
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def validate(x, y, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """In-memory ``(x, y)`` checked and converted: x float (N, ...) of finite values (uint8: scaled to
    [0, 1]); y integer class labels (N,) >= 0, or float targets of any shape (N, ...)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise InputError(f"{name}: x must be float32 (N x C x H x W), got {x.dtype}")
        if x.dtype == np.uint8:  # one float32 copy, scaled in place (not a second one for the division)
            x = x.astype(np.float32)
            x /= 255.0
        x = torch.as_tensor(x)
    if not isinstance(y, torch.Tensor):
        y = np.asarray(y)
        if y.dtype.kind not in "iuf" or (y.dtype.kind in "iu" and y.size and int(y.max()) >= 2**31):
            raise InputError(f"{name}: y must hold integer class labels below 2^31 (or float targets), got {y.dtype}")
        y = torch.as_tensor(y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float32))
    if not x.is_floating_point():
        raise InputError(f"{name}: x must be float32 (N x C x H x W), got {x.dtype}")
    if x.dim() == 3:
        x = x[:, None]
    if not 2 <= x.dim() <= 5:
        raise InputError(f"{name}: x must have rank 4 (N x C x H x W), got shape {tuple(x.shape)}")
    if y.dtype == torch.bool or y.dim() == 0 or len(y) != len(x):
        raise InputError(f"{name}: y must hold {len(x)} targets (class labels), got shape {tuple(y.shape)}")
    if len(x) == 0:
        raise InputError(f"{name}: no samples")
    x = x.float()
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: x holds NaN or infinite values")
    if not y.is_floating_point():
        if y.dim() != 1:
            raise InputError(f"{name}: y must be a vector of {len(x)} labels, got shape {tuple(y.shape)}")
        if (y < 0).any():
            raise InputError(f"{name}: negative labels")
        y = y.long()
    return x.contiguous(), y


def _to_target(v) -> Any:
    """A sample's (or batch's) target with its kind kept: integer labels as int64 (what cross-entropy
    takes), float targets as they are, arrays as tensors; anything else (dicts, strings) untouched."""
    if type(v).__module__.startswith("PIL."):  # a mask image: its pixel values are the labels
        v = np.asarray(v)
    if isinstance(v, (np.ndarray, np.generic)):  # an array, or one NumPy number (``y[i]`` of an array)
        a = np.asarray(v)  # (not ascontiguousarray: it makes a number an array of one)
        v = torch.from_numpy(a if a.flags.c_contiguous else a.copy())
    if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool:
        return v.long()
    return v


def _to_tensor(v) -> Any:
    """A sample's input as a float tensor: PIL images (C x H x W in [0, 1]) and arrays are converted."""
    if isinstance(v, torch.Tensor):
        return v.float() if not v.is_floating_point() and v.dtype != torch.bool else v
    if isinstance(v, np.ndarray):
        return _to_tensor(torch.from_numpy(np.ascontiguousarray(v)))
    if type(v).__module__.startswith("PIL."):
        return pil_to_tensor(v)
    return v


class MapData(Data):
    """A map-style ``torch.utils.data.Dataset`` whose item ``i`` is ``(input, target)``; batches are built
    with ``collate`` (a DataLoader's ``collate_fn``; default: torch's ``default_collate``)."""

    def __init__(self, dataset, name: str = "data", collate: Callable | None = None, workers: int = 0):
        self.dataset, self.name, self.collate, self.workers = dataset, name, collate, workers

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, i: int):
        try:
            s = self.dataset[i]
        except CompressError:
            raise
        except Exception as e:
            raise InputError(f"data {self.name}: reading sample {i} failed: {type(e).__name__}: {first_line(e)}") from e
        if not (isinstance(s, (tuple, list)) and len(s) == 2):
            kind = f"a {type(s).__name__} of {len(s)}" if isinstance(s, (tuple, list)) else f"a {type(s).__name__}"
            raise InputError(f"data {self.name}: sample {i} is {kind}, not (input, target)")
        return _to_tensor(s[0]), _to_target(s[1])

    def batch(self, indices, train: bool = False) -> Batch:
        idx = [int(i) for i in indices]
        samples = [self.sample(i) for i in idx]
        if self.collate is not None:
            try:
                return self.collate(samples)
            except Exception as e:
                raise InputError(
                    f"data {self.name}: its collate_fn failed on samples {idx[0]}..: "
                    f"{type(e).__name__}: {first_line(e)}"
                ) from e
        return collate(samples, idx, self.name)

    def labels(self) -> torch.Tensor | None:
        t = getattr(self.dataset, "targets", None)  # torchvision's datasets, and many users' own, keep them
        ds = self.dataset
        if t is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
            t = ds.tensors[1]  # (a TensorDataset in a DataLoader): known up front, as of the TensorDataset alone
        if t is None:
            return None
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError):
            return None
        return t.long() if t.dim() == 1 and len(t) == len(self) and not t.is_floating_point() else None


def collate(samples: list, indices: list[int], name: str) -> Batch:
    """Stack ``(input, target)`` samples; a sample whose shape differs from the first is named."""
    xs, ys = zip(*samples, strict=False)
    if not all(isinstance(x, torch.Tensor) for x in xs):
        bad = next(i for i, x in zip(indices, xs, strict=False) if not isinstance(x, torch.Tensor))
        raise InputError(
            f"data {name}: sample {bad}'s input is a {type(xs[indices.index(bad)]).__name__}, "
            "not a tensor, array or image"
        )
    for i, x in zip(indices, xs, strict=False):
        if x.shape != xs[0].shape:
            raise InputError(
                f"data {name}: sample {i} has shape {tuple(x.shape)} but sample {indices[0]} has "
                f"{tuple(xs[0].shape)}; resize them to one size (for a folder: ?size=N or ?resize=N&crop=N)"
            )
    try:
        y = torch.utils.data.default_collate(list(ys))
    except Exception as e:
        raise InputError(
            f"data {name}: targets of samples {indices[0]}..{indices[-1]} do not stack: {first_line(e)}"
        ) from e
    return torch.stack(xs), y


class IterData(Data):
    """An iterable ``Dataset`` of samples, or a ``DataLoader`` (read as it batches): no indices, so no
    held-out split and no shuffling by compress; each epoch is one pass."""

    iterable = True

    def __init__(self, source, name: str = "data", batched: bool = False):
        self.source, self.name, self.batched = source, name, batched

    def __len__(self) -> int:
        try:
            return len(self.source.dataset if self.batched else self.source)
        except (TypeError, AttributeError):
            raise InputError(f"data {self.name}: an iterable data set has no length") from None

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        it = iter(self.source)
        if self.batched:
            for i, b in enumerate(_guard(it, self.name)):
                if not (isinstance(b, (tuple, list)) and len(b) == 2):
                    raise InputError(f"data {self.name}: batch {i} is a {type(b).__name__}, not (inputs, targets)")
                yield _to_tensor(b[0]), _to_target(b[1])
            return
        buf, idx = [], []
        for i, s in enumerate(_guard(it, self.name)):
            if not (isinstance(s, (tuple, list)) and len(s) == 2):
                raise InputError(f"data {self.name}: sample {i} is a {type(s).__name__}, not (input, target)")
            buf.append((_to_tensor(s[0]), _to_target(s[1])))
            idx.append(i)
            if len(buf) == batch_size:
                yield collate(buf, idx, self.name)
                buf, idx = [], []
        if buf:
            yield collate(buf, idx, self.name)

    def subset(self, indices, name=None):
        raise InputError(
            f"data {self.name}: an iterable data set cannot be split or subsampled; give "
            "validation data of its own (--val-data) or a map-style Dataset"
        )


def _guard(it, name: str):
    """Iterate, turning an exception raised by the user's loader into a one-line error naming the data."""
    i = 0
    while True:
        try:
            v = next(it)
        except StopIteration:
            return
        except CompressError:
            raise
        except Exception as e:
            raise InputError(f"data {name}: reading item {i} failed: {type(e).__name__}: {first_line(e)}") from e
        yield v
        i += 1


# ----------------------------------------------------------------------------- what users hand us
KINDS = "(x, y) tensors, a torch Dataset of (input, target) samples, a DataLoader or a compress.data.Data"


def as_data(obj, name: str = "data", workers: int = 0, *, arg: str | None = None) -> Data:
    """Any data users have, as a ``Data``: a ``Data``; ``(x, y)`` tensors or arrays; a map-style or iterable
    ``torch.utils.data.Dataset`` of ``(input, target)`` samples; a ``DataLoader`` (compress reads its dataset
    with its ``collate_fn`` and ``num_workers``, in batches of its own size). Targets keep their kind: integer
    labels are int64 whichever way they come, float targets stay float.

    Every public function that takes data converts it here, once. ``name``: what the numbers measured on
    it say they were measured on; ``arg``: the keyword argument it came in (named by the error for an object
    that is not data)."""
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    if isinstance(obj, Data):
        if workers:
            obj.workers = workers
        return obj
    if isinstance(obj, DataLoader):
        ds = obj.dataset
        workers = workers or obj.num_workers
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            return IterData(obj, name, batched=obj.batch_size is not None)
        default = obj.collate_fn is torch.utils.data.default_collate
        return MapData(ds, name, collate=None if default else obj.collate_fn, workers=workers)
    if isinstance(obj, IterableDataset):
        return IterData(obj, name)
    if isinstance(obj, TensorDataset) and len(obj.tensors) == 2:  # tensors already: read them as such
        obj = obj.tensors
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], (tuple, list)):
        x, y = validate(obj[0], obj[1], name)
        return TensorData(x, y, name)
    # a string, a dict, one tensor or array index too, but none is a data set of (input, target) samples
    not_samples = (str, bytes, dict, torch.Tensor, np.ndarray)
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, not_samples):
        return MapData(obj, name, workers=workers)
    hint = " (a spec such as 'mnist5k' is read by compress.data.load(spec))" if isinstance(obj, str) else ""
    raise InputError(f"{arg or f'data {name}'}: a {type(obj).__name__} is not data compress reads: give {KINDS}{hint}")


# ----------------------------------------------------------------------------- splits and checks
def split(data, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[Data, Data]:
    """Deterministic train/validation split by index of ``data`` (anything ``as_data`` takes): stratified by
    class when the labels are known up front, else a seeded random split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    data = as_data(data, arg="data")
    if data.iterable:
        data.subset(None)  # raises the one-line reason
    g = torch.Generator().manual_seed(seed)
    y = data.labels()
    if y is None:
        perm = torch.randperm(len(data), generator=g)
        k = max(1, int(round(len(data) * val_fraction)))
        tr, va = perm[k:], perm[:k]
    else:
        train_idx, val_idx = [], []
        for c in torch.unique(y):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            k = max(1, int(round(len(idx) * val_fraction))) if len(idx) > 1 else 0
            val_idx.append(idx[:k])
            train_idx.append(idx[k:])
        tr = torch.cat(train_idx)
        va = torch.cat(val_idx)
        tr = tr[torch.randperm(len(tr), generator=g)]
    return data.subset(tr, f"{data.name}[train]"), data.subset(va, f"{data.name}[val]")


def check_fits(model: torch.nn.Module, data, num_classes: int | None = None, labels_needed: bool = True) -> None:
    """Raise InputError if the data (anything ``as_data`` takes) does not fit the model (input shape; label
    range when the targets are class labels known up front)."""
    data = as_data(data, arg="data")

    x = data.head(2)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(distributed.device_of(model)))  # data follows the model
    except Exception as e:
        raise InputError(
            f"data {data.name} (samples of shape {tuple(x.shape[1:])}) does not fit the model: {first_line(e)}"
        ) from e
    finally:
        model.train(was)
    if not labels_needed:
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(
            f"the model's output has shape {tuple(getattr(out, 'shape', ()))}; expected (batch, classes) "
            "logits (for other outputs give a --loss and --metric of your own)"
        )
    y = data.labels()
    n = num_classes or out.shape[1]
    if y is not None and len(y) and int(y.max()) >= n:
        raise InputError(f"data {data.name} has label {int(y.max())} but the model has {n} classes")
