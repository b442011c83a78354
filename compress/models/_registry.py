"""Model registry (after timm): ``@register_model`` factories, ``create_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from compress.config import close_matches
from compress.errors import UsageError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_doc(name: str) -> str:
    doc = (_MODELS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, **kw) -> nn.Module:
    """Build a zoo model by name; the model remembers how it was made in ``compress_meta``."""
    if name not in _MODELS:
        raise UsageError(f"unknown model {name!r}{close_matches(name, _MODELS)}; known: {', '.join(list_models())}")
    model: Any = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kw)
    model.compress_meta = {
        "arch": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "arch_kwargs": dict(kw),
    }
    return model
