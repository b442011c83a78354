"""Plain-data metadata on a model's root module: input shape, classes, history of stages.

Kept apart from loading and saving so that every stage can record what it did without importing
file formats.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

META_ATTR = "compress_meta"


def get_meta(model: nn.Module) -> dict[str, Any]:
    meta = getattr(model, META_ATTR, None)
    return meta if isinstance(meta, dict) else {}


def set_meta(model: nn.Module, **kw) -> dict[str, Any]:
    """Merge plain-data metadata (lists, numbers, strings) into the model's metadata dict."""
    meta = dict(get_meta(model))
    meta.update(kw)
    setattr(model, META_ATTR, meta)
    return meta


def add_history(model: nn.Module, entry: dict[str, Any]) -> None:
    meta = get_meta(model)
    set_meta(model, history=list(meta.get("history", [])) + [entry])
