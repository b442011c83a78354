"""What compress reads data through: a ``Data`` of ``(input, target)`` samples, read in batches.

Every kind of data users have -- tensors in memory, a memory-mapped array, a PyTorch ``Dataset``
(map-style or iterable), a ``DataLoader``, a folder of images -- is one ``Data``. Fine-tuning,
evaluation, calibration, BatchNorm re-estimation, sensitivity analysis and held-out splits read it
by indices and batches (``batches``), never as one tensor, so memory does not grow with the data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from compress.errors import CompressError, InputError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, Any]


class Data:
    """A data set compress reads. Map-style subclasses implement ``__len__`` and ``batch(indices)``.

    Attributes:
        name: what every number measured on it says it was measured on.
        workers: loader processes reading batches ahead (0: read in the caller's process).
    """

    name: str = "data"
    workers: int = 0
    iterable: bool = False  # True: no length or indices, read front to back (``IterData``)

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: Sequence[int] | torch.Tensor, train: bool = False) -> Batch:
        """The samples at ``indices`` as one batch ``(inputs, targets)``. ``train``: with the training-time
        augmentation the data defines (random crops and flips of an image folder)."""
        raise NotImplementedError

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        """Iterable data: its batches front to back (map-style data are read by index instead)."""
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """Integer class labels of every sample when known without reading the samples (for stratified
        splits and the label check); None otherwise."""
        return None

    def subset(self, indices, name: str | None = None) -> Data:
        return Subset(self, indices, name or self.name)

    def head(self, n: int) -> torch.Tensor:
        """Inputs of the first ``n`` samples (fewer when there are fewer)."""
        for x, _ in batches(self, n, workers=0):
            return x[:n]
        raise InputError(f"data {self.name}: no samples")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input (C, H, W for images)."""
        return tuple(self.head(1).shape[1:])

    @property
    def num_classes(self) -> int:
        """1 + the largest integer label (the labels are read if they are not known up front)."""
        y = self.labels()
        if y is None:
            y = torch.cat([_as_labels(t, self.name) for _, t in batches(self, 1024)])
        return int(y.max()) + 1 if len(y) else 0

    def __repr__(self) -> str:
        size = "" if self.iterable else f", {len(self):,} samples"
        return f"{type(self).__name__}({self.name!r}{size})"


def _as_labels(t, name: str) -> torch.Tensor:
    if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point()):
        raise InputError(
            f"data {name}: targets are not integer class labels (got "
            f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}); give a --loss and --metric of your own"
        )
    return t.long()


class Subset(Data):
    """Some samples of another data set, by index (held-out splits, ``?limit=``)."""

    def __init__(self, base: Data, indices, name: str):
        self.base, self.indices, self.name = base, torch.as_tensor(indices, dtype=torch.long), name
        self.workers = base.workers

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices, train: bool = False) -> Batch:
        return self.base.batch(self.indices[torch.as_tensor(indices, dtype=torch.long)], train)

    def labels(self) -> torch.Tensor | None:
        y = self.base.labels()
        return None if y is None else y[self.indices]

    def subset(self, indices, name: str | None = None) -> Subset:
        return Subset(self.base, self.indices[torch.as_tensor(indices, dtype=torch.long)], name or self.name)


class Mapped(Data):
    """Another data set with a function applied to each batch of inputs (``?size=``, ``?channels=``)."""

    def __init__(self, base: Data, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        self.base, self.fn, self.name, self.workers = base, fn, name, base.workers
        self.iterable = base.iterable

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, indices, train: bool = False) -> Batch:
        x, y = self.base.batch(indices, train)
        return self.fn(x), y

    def iter_batches(self, batch_size: int) -> Iterator[Batch]:
        for x, y in self.base.iter_batches(batch_size):
            yield self.fn(x), y

    def labels(self) -> torch.Tensor | None:
        return self.base.labels()


# ----------------------------------------------------------------------------- reading in batches
class _Chunks(torch.utils.data.Dataset):
    """For a DataLoader with ``batch_size=None``: item k is the batch of the k-th index chunk."""

    def __init__(self, data: Data, train: bool):
        self.data, self.train = data, train

    def __getitem__(self, chunk):
        return self.data.batch(chunk, self.train)


class _Chunking:
    """``order`` in consecutive chunks of ``size``, made as they are asked for (a DataLoader's sampler)."""

    def __init__(self, order: torch.Tensor, size: int):
        self.order, self.size = order, size

    def __len__(self) -> int:
        return -(-len(self.order) // self.size)

    def __iter__(self):
        return (self.order[i : i + self.size] for i in range(0, len(self.order), self.size))


def batches(
    data: Data,
    batch_size: int,
    order: torch.Tensor | None = None,
    *,
    train: bool = False,
    workers: int | None = None,
    pin: bool = False,
) -> Iterator[Batch]:
    """``(inputs, targets)`` batches of ``data`` in ``order`` (sample indices; default: all, in order).
    With ``workers`` (default: the data's own) batches are read ahead in that many processes."""
    if data.iterable:
        yield from data.iter_batches(batch_size)
        return
    order = torch.arange(len(data)) if order is None else order
    chunks = _Chunking(order, batch_size)
    workers = data.workers if workers is None else workers
    if not workers or len(chunks) < 2:
        for c in chunks:
            yield data.batch(c, train)
        return
    loader = torch.utils.data.DataLoader(
        _Chunks(data, train), batch_size=None, sampler=chunks, num_workers=workers, pin_memory=pin, prefetch_factor=4
    )
    try:
        yield from loader
    except CompressError as e:  # re-raised from a worker: its message is the worker's traceback; keep the error
        raise type(e)(_worker_message(e)) from None
    except Exception as e:
        raise InputError(f"data {data.name}: a loader process failed: {_worker_message(e)}") from None


def _worker_message(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    for prefix in ("compress.errors.InputError: ", "compress.errors.FormatError: ", "InputError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def eval_batch_size(data: Data) -> int:
    """Samples per evaluation batch: 1,000, fewer for large inputs (at most 2^24 input values a batch)."""
    try:
        per = math.prod(data.sample_shape)
    except CompressError:
        per = 1
    return max(1, min(1000, (1 << 24) // max(1, per)))


# held out of training data for validation when no validation data is given: 20% (1,000 of mnist5k)
# gives a budget test a standard error of about 0.3 pt on the paired accuracy difference
VAL_FRACTION = 0.2
