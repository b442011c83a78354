"""Config base class and the config -> handler registry (after torchao's `quantize_`).

One frozen dataclass per method; its ``Args:`` docstring explains the options and
``__post_init__`` checks them with ``ValueError``. Configs serialise to JSON with a type and
version, so a recipe file, a report and a .cpz header can all say exactly what was done.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import torch.nn as nn

CONFIG_VERSION = 1
_CONFIG_TYPES: dict[str, type["Config"]] = {}
_HANDLERS: dict[type, Callable[..., nn.Module]] = {}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every method config. Subclasses are frozen dataclasses."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__name__
        if name in _CONFIG_TYPES and _CONFIG_TYPES[name].__module__ != cls.__module__:
            raise ValueError(f"config type {name!r} is registered twice")
        _CONFIG_TYPES[name] = cls

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, "version": CONFIG_VERSION, **body}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Config":
        d = dict(d)
        name = d.pop("type", None)
        d.pop("version", None)
        cls = _CONFIG_TYPES.get(name)
        if cls is None:
            raise ValueError(f"unknown config type {name!r}; known: {', '.join(sorted(_CONFIG_TYPES))}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return v


def register_handler(config_cls: type[Config]):
    """Decorator: ``@register_handler(ThresholdConfig) def _threshold(model, config, **kw)``."""

    def deco(fn):
        if config_cls in _HANDLERS:
            raise ValueError(f"a handler for {config_cls.__name__} is registered twice")
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def handler_for(config: Config, stage: str) -> Callable[..., nn.Module]:
    fn = _HANDLERS.get(type(config))
    if fn is None:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
        raise TypeError(f"{stage}: no handler for {type(config).__name__}; known configs: {known}")
    return fn


def per_layer(value, fqn: str, default=None):
    """Resolve a per-layer override: a scalar, or a dict keyed by FQN with "_default"."""
    if isinstance(value, dict):
        if fqn in value:
            return value[fqn]
        return value.get("_default", default)
    return value


def close_matches(name: str, names) -> str:
    m = difflib.get_close_matches(name, list(names), n=3)
    return f" (did you mean {', '.join(m)}?)" if m else ""
