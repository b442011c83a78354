"""Configs, the parts every config shares, and the per-verb registries (after torchao's `quantize_`).

One frozen dataclass per method; its ``Args:`` docstring explains the options and
``__post_init__`` checks them with ``ValueError``. Every method config embeds the same two parts:

* ``Select`` -- which layers the stage touches (types, FQN globs, excludes, a ``filter_fn``, and
  whether a conv stem and the classifier are spared), with one resolver for per-layer overrides;
* ``FineTune`` -- the fine-tuning after (or during) the stage; ``epochs`` is always the *total*.

A config names its verb (``prune``, ``quantize``, ``factorize``) and its stage name in a recipe;
``register_method`` ties it to its method class. A verb refuses another verb's config with an error
that names the right verb. Configs serialise to JSON with a type and version, so a recipe, a report
and a .cpz header can all say exactly what was done.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from typing import Any, Callable, ClassVar, Union

import torch.nn as nn

Layer = Union[nn.Conv2d, nn.Linear]  # what methods change: its .weight is a Tensor (a plain Module's attributes are not typed)

from .errors import UsageError

CONFIG_VERSION = 2
_CONFIG_TYPES: dict[str, type["Config"]] = {}
_METHODS: dict[str, dict[type, type]] = {}  # verb -> {config class -> Method class}
VERBS = ("prune", "quantize", "factorize")


def type_key(m: nn.Module) -> str:
    """The layer-type key of per-layer overrides: "conv", "linear" or the class name."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    return type(m).__name__


def per_layer(value, fqn: str, module: nn.Module | None = None, default=None):
    """Resolve a per-layer setting: a scalar, or a dict keyed by FQN, then by layer type
    ("conv", "linear"), then "_default"."""
    if not isinstance(value, dict):
        return value
    if fqn in value:
        return value[fqn]
    if module is not None and type_key(module) in value:
        return value[type_key(module)]
    return value.get("_default", default)


def check_keys(value, names, message: str, types=("conv", "linear")) -> None:
    """A per-layer dict may name only chosen layers, layer types and "_default" (what ``per_layer``
    resolves); any other key is a UsageError: ``message`` (formatted with ``key``) and close matches."""
    if not isinstance(value, dict):
        return
    names = list(names)
    for k in value:
        if k != "_default" and k not in types and k not in names:
            raise UsageError(message.format(key=k) + close_matches(k, names))


def close_matches(name: str, names) -> str:
    m = difflib.get_close_matches(name, list(names), n=3)
    return f" (did you mean {', '.join(m)}?)" if m else ""


@dataclasses.dataclass(frozen=True)
class Select:
    """Which layers a stage touches.

    Args:
        types: layer kinds: "conv", "linear" (both by default).
        names: glob patterns of layer FQNs ("fc*", "layer3.*"); empty: every layer of ``types``.
        exclude: glob patterns of layer FQNs to leave alone.
        filter_fn: ``(module, fqn) -> bool``, applied on top of the rest (library use only).
        spare_first_last: a conv stem and the classifier are the most sensitive layers; each
            method spares them its own way (threshold prunes them less, factorize skips them).
            A layer named exactly in ``names`` is never spared.
    """

    types: tuple = ("conv", "linear")
    names: tuple = ()
    exclude: tuple = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    spare_first_last: bool = True

    def __post_init__(self):
        for f in ("types", "names", "exclude"):
            v = getattr(self, f)
            if isinstance(v, str):
                object.__setattr__(self, f, (v,))
            elif isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        bad = [t for t in self.types if t not in ("conv", "linear")]
        if bad or not self.types:
            raise ValueError(f"select types must be 'conv' and/or 'linear', got {list(self.types)}")
        for p in self.names + self.exclude:
            if not isinstance(p, str) or not p:
                raise ValueError(f"select patterns must be non-empty strings, got {p!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"select filter_fn must be a callable (module, fqn) -> bool, got {self.filter_fn!r}")
        if not isinstance(self.spare_first_last, bool):
            raise ValueError(f"select spare_first_last must be true or false, got {self.spare_first_last!r}")

    def _matches(self, name: str, m: nn.Module) -> bool:
        if type_key(m) not in self.types:
            return False
        if self.names and not any(fnmatch.fnmatchcase(name, p) for p in self.names):
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return False
        return self.filter_fn is None or bool(self.filter_fn(m, name))

    def layers(self, model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> list[tuple[str, Layer]]:
        """The chosen layers, in module order. A pattern that matches no layer is an error."""
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
        for p in self.names:
            if not any(fnmatch.fnmatchcase(n, p) for n, _ in candidates):
                raise UsageError(f"layer pattern {p!r} matches no layer"
                                 f"{close_matches(p, [n for n, _ in candidates])}")
        return [(n, m) for n, m in candidates if self._matches(n, m)]

    def ends(self, model: nn.Module) -> set[str]:
        """FQNs of the layers this selection spares: a conv stem and the last layer, unless named."""
        if not self.spare_first_last:
            return set()
        all_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not all_layers:
            return set()
        ends = {all_layers[-1][0]}
        if isinstance(all_layers[0][1], nn.Conv2d):
            ends.add(all_layers[0][0])
        return {n for n in ends if n not in self.names}


def uncovered(model: nn.Module, layers) -> str | None:
    """The matrices no layer of ``layers`` ([(name, module)]) holds as its weight -- e.g.
    MultiheadAttention's in_proj_weight, which no Conv/Linear module holds -- said in a few words;
    None when there are none."""
    chosen = {f"{n}.weight" if n else "weight" for n, _ in layers}
    left = [(n, p.numel()) for n, p in model.named_parameters() if p.dim() >= 2 and n not in chosen]
    if not left:
        return None
    names = ", ".join(n for n, _ in left[:3]) + (", ..." if len(left) > 3 else "")
    return f"{sum(k for _, k in left):,} weights of {len(left)} tensor(s) no selected Conv/Linear layer holds ({names})"


@dataclasses.dataclass(frozen=True)
class FineTune:
    """Fine-tuning of a stage, on the training data given to it.

    Args:
        epochs: total epochs of the stage (0: none); a method with rounds splits them over its rounds.
        lr: peak learning rate (cosine decay).
        optimizer: "adam" or "sgd".
        batch_size: samples per step.
        augment: random shifts of up to this many pixels; None: as the model was trained (its metadata;
            ``fit`` alone: none).
        weight_decay: L2 weight decay.
        distill: learn from the input model's outputs at this temperature (Hinton et al.'s knowledge
            distillation; e.g. 4); None: the task loss alone.
        distill_weight: the distillation term's share of the loss (the task loss has the rest).
        seed: seeds the order of the samples (and the data's random augmentation).
    """

    epochs: float = 0.0
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 64
    augment: int | None = None
    distill: float | None = None
    distill_weight: float = 0.5
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.epochs >= 0:  # also refuses NaN
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.augment is not None and self.augment < 0:
            raise ValueError("augment must be >= 0")
        if self.distill is not None and not self.distill > 0:
            raise ValueError(f"distill (a temperature) must be > 0, got {self.distill}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")


_PARTS = {"select": Select, "finetune": FineTune}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every method config. Subclasses are frozen dataclasses and set ``verb``,
    ``stage_name`` (its name in a recipe), ``search_key`` (the option a recipe may list) and
    ``iterative`` (its search candidates build on each other, as iterative pruning does). A search key
    may name a part's option ("finetune.epochs"). ``first_fit``: the candidates cost more rather than
    compress more (PTQ, then QAT): the first within budget is kept and the rest are not tried."""

    verb: ClassVar[str] = ""
    stage_name: ClassVar[str] = ""
    search_key: ClassVar[str] = ""
    iterative: ClassVar[bool] = False  # in a recipe's search, each candidate continues from the previous one
    first_fit: ClassVar[bool] = False  # in a recipe's search, the first candidate within budget ends it
    renamed: ClassVar[dict[str, str]] = {}  # old option name -> new: still read, with a FutureWarning
    select: Select  # the two parts every config has (each subclass gives its own default)
    finetune: FineTune

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__name__
        if name in _CONFIG_TYPES and _CONFIG_TYPES[name].__module__ != cls.__module__:
            raise ValueError(f"config type {name!r} is registered twice")
        _CONFIG_TYPES[name] = cls

    def searched(self) -> Any:
        """The value of this config's search key (a part's option when the key is "part.option")."""
        value: Any = self
        for name in self.search_key.split("."):
            value = getattr(value, name)
        return value

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, "version": CONFIG_VERSION, **body}

    def changes(self) -> dict[str, Any]:
        """Only the options that differ from the defaults (parts too), for ``from_dict``: what a
        file's history keeps in a few bytes."""
        default = {}
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                default[f.name] = _jsonable(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default[f.name] = _jsonable(f.default_factory())
        out = {"type": type(self).__name__, "version": CONFIG_VERSION}
        for k, v in self.to_dict().items():
            if isinstance(v, dict) and isinstance(default.get(k), dict) and k in _PARTS:
                diff = {kk: vv for kk, vv in v.items() if default[k].get(kk) != vv}
                if diff:
                    out[k] = diff
            elif k not in out and default.get(k, object()) != v:
                out[k] = v
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Config":
        d = dict(d)
        name = d.pop("type", None)
        version = d.pop("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"config version {version!r} is newer than this compress reads ({CONFIG_VERSION})")
        cls = _CONFIG_TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"unknown config type {name!r}; known: {', '.join(sorted(_CONFIG_TYPES))}")
        return cls.from_options(d)

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> "Config":
        """Build from plain data (a recipe stage, a JSON header): parts may be given as dicts."""
        opts = dict(opts)
        for old, new in cls.renamed.items():
            if old in opts and new not in opts:
                warnings.warn(f"{cls.stage_name}: option {old!r} is now {new!r}", FutureWarning, stacklevel=3)
                opts[new] = opts.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(f"{cls.stage_name or cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        kw = {}
        for k, v in opts.items():
            if k in _PARTS and isinstance(v, dict):
                v = _part(k, v, cls)
            elif isinstance(v, list):
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    @classmethod
    def part(cls, key: str, **changes) -> Any:
        """This config's default ``select`` / ``finetune`` with ``changes`` (None values ignored)."""
        return _part(key, {k: v for k, v in changes.items() if v is not None}, cls)


def _part(key: str, d: dict, owner) -> Any:
    """A Select/FineTune from a dict, starting from the owner's default part (its own defaults)."""
    part_cls = _PARTS[key]
    fields = {f.name for f in dataclasses.fields(part_cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{key}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    if d.get("filter_fn") is not None:  # data names no code: a recipe or a header selects layers by names and types
        raise ValueError(f"{key}: filter_fn is a callable for library use; in a recipe select layers with names, "
                         "exclude and types")
    default = {f.name: f for f in dataclasses.fields(owner)}[key]
    base = default.default_factory() if default.default_factory is not dataclasses.MISSING else part_cls()
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _jsonable(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return v


def register_method(config_cls: type[Config]):
    """Class decorator: ``@register_method(ThresholdConfig) class ThresholdPruner(Method)``."""
    if config_cls.verb not in VERBS:
        raise ValueError(f"{config_cls.__name__}.verb must be one of {VERBS}")

    def deco(method_cls):
        table = _METHODS.setdefault(config_cls.verb, {})
        if config_cls in table:
            raise ValueError(f"a method for {config_cls.__name__} is registered twice")
        table[config_cls] = method_cls
        return method_cls

    return deco


def method_for(config: Config, verb: str) -> type:
    """The method class of ``config`` under ``verb``; a config of another verb is a clear error."""
    if not isinstance(config, Config):
        raise UsageError(f"{verb}_ takes a config, got {type(config).__name__}")
    table = _METHODS.get(verb, {})
    cls = table.get(type(config))
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in table))
        other = f"; {type(config).__name__} belongs to {config.verb}_" if config.verb and config.verb != verb else ""
        raise UsageError(f"{verb}_ does not take {type(config).__name__}{other}. {verb}_ takes: {known}")
    return cls


def stage_types() -> dict[str, type[Config]]:
    """Recipe stage name -> config class, for every registered method."""
    return {c.stage_name: c for table in _METHODS.values() for c in table}  # type: ignore[attr-defined]
