"""Plain-data metadata on a model's root module: input shape, classes, history of stages.

Kept apart from loading and saving so that every stage can record what it did without importing
file formats. On the module and in files it is a plain dict (data a file may carry); code reads it
through ``read_meta``, a typed ``ModelMeta`` whose every field is checked, since a file's metadata is
input like any other: a value of the wrong type is left out, never trusted.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch.nn as nn

log = logging.getLogger(__name__)

META_ATTR = "compress_meta"


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """Args:
    arch: the zoo model it was built as (``create_model(arch, **arch_kwargs)``).
    arch_kwargs, num_classes, in_channels: how the zoo built it.
    arch_ref: the ``--arch module:callable`` that rebuilds it (a model of the user's classes).
    input_shape: (1, C, H, W) it takes.
    train_data: the data spec it was trained on; val_fraction: the share held out of it; augment: the
        pixel shifts it was trained with (fine-tuning does the same unless told otherwise).
    history: what compress did to it, one entry per stage ({"stage", "config"}).
    val_accuracy, test_accuracy: as ``zoo train`` measured them.
    """

    arch: str | None = None
    arch_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: int | None = None
    in_channels: int | None = None
    arch_ref: str | None = None
    input_shape: list | None = None
    train_data: str | None = None
    val_fraction: float | None = None
    augment: int | None = None
    history: list = dataclasses.field(default_factory=list)
    val_accuracy: float | None = None
    test_accuracy: float | None = None


_TYPES: dict[str, tuple] = {
    "arch": (str,),
    "arch_kwargs": (dict,),
    "num_classes": (int,),
    "in_channels": (int,),
    "arch_ref": (str,),
    "input_shape": (list, tuple),
    "train_data": (str,),
    "val_fraction": (float,),
    "augment": (int,),
    "history": (list,),
    "val_accuracy": (float, int),
    "test_accuracy": (float, int),
}
FIELDS = frozenset(_TYPES)


def read_meta(model: nn.Module) -> ModelMeta:
    """The model's metadata, typed: fields of the wrong type (a file may say anything) are left out."""
    raw = get_meta(model)
    kw: dict[str, Any] = {}
    for k, types in _TYPES.items():
        v = raw.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            log.warning("model metadata %s: a %s, not the expected type; ignored", k, type(v).__name__)
            continue
        kw[k] = list(v) if isinstance(v, tuple) else v
    return ModelMeta(**kw)


def get_meta(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, META_ATTR, None)
    return meta if isinstance(meta, dict) else {}


def set_meta(model: nn.Module, **kw) -> dict[str, Any]:
    """Merge plain-data metadata (lists, numbers, strings) into the model's metadata dict; the keys are
    ``ModelMeta``'s fields (a misspelt one is an error, not a silent new key)."""
    unknown = sorted(set(kw) - FIELDS)
    if unknown:
        raise TypeError(f"set_meta: unknown metadata {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    meta = dict(get_meta(model))
    meta.update(kw)
    setattr(model, META_ATTR, meta)
    return meta


def add_history(model: nn.Module, entry: dict[str, Any]) -> None:
    set_meta(model, history=list(read_meta(model).history) + [entry])
