"""Configs, the parts every config shares, and the per-verb registries (after torchao's `quantize_`).

One frozen dataclass per method; its ``Args:`` docstring explains the options and
``__post_init__`` checks them with ``ValueError``. Every method config embeds the same two parts:

* ``Select`` -- which layers the stage touches (types, FQN globs, excludes, and whether a conv stem and the
  classifier are spared), with one resolver for per-layer overrides;
* ``FineTune`` -- the fine-tuning after (or during) the stage; ``epochs`` is always the *total*.

A config names its verb (``prune``, ``quantize``, ``factorize``) and its stage name in a recipe;
``register_method`` ties it to its method class. A verb refuses another verb's config with an error
that names the right verb. Configs are data: they serialise to JSON with a type and version, so a recipe,
a report and a .cpz header can all say exactly what was done, and ``Config.from_dict(c.to_dict()) == c``. Code
that chooses layers (a ``filter_fn``) is an argument of the verb, not a field (``Selection``).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn as nn

from compress.bounds import bounded, check_fields, got
from compress.errors import UsageError, safe

# what methods change: its .weight is a Tensor (a plain Module's attributes are not typed)
Layer = nn.Conv2d | nn.Linear
FilterFn = Callable[[nn.Module, str], bool]  # (module, fqn) -> whether a stage may touch the layer

_CONFIG_TYPES: dict[str, type[Config]] = {}
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


# ----------------------------------------------------------------------------- declared ranges
@dataclasses.dataclass(frozen=True)
class Select:
    """Which layers a stage touches.

    Args:
        types: layer kinds: "conv", "linear" (both by default).
        names: glob patterns of layer FQNs ("fc*", "layer3.*"); empty: every layer of ``types``.
        exclude: glob patterns of layer FQNs to leave alone.
        spare_first_last: a conv stem and the classifier are the most sensitive layers; each
            method spares them its own way (threshold prunes them less, factorize skips them).
            A layer named exactly in ``names`` is never spared.
    """

    option_prefix: ClassVar[str] = "select."  # how its options are named in errors (as --set and recipes spell them)

    types: tuple = bounded(str, 1, 16, ("conv", "linear"), many=2)
    names: tuple = bounded(str, 1, 1000, (), many=1000)
    exclude: tuple = bounded(str, 1, 1000, (), many=1000)
    spare_first_last: bool = bounded(bool, 0, 1, True)

    def __post_init__(self):
        for f in ("types", "names", "exclude"):
            v = getattr(self, f)
            if isinstance(v, str):
                object.__setattr__(self, f, (v,))
            elif isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        check_fields(self)
        bad = [t for t in self.types if t not in ("conv", "linear")]
        if bad or not self.types:
            raise ValueError(f"select types must be 'conv' and/or 'linear', got {list(self.types)}")

    def _matches(self, name: str, m: nn.Module) -> bool:
        if type_key(m) not in self.types:
            return False
        if self.names and not any(fnmatch.fnmatchcase(name, p) for p in self.names):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def layers(self, model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> list[tuple[str, Layer]]:
        """The chosen layers, in module order. A pattern that matches no layer is an error."""
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
        for p in self.names:
            if not any(fnmatch.fnmatchcase(n, p) for n, _ in candidates):
                raise UsageError(f"layer pattern {p!r} matches no layer{close_matches(p, [n for n, _ in candidates])}")
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


@dataclasses.dataclass(frozen=True)
class Selection:
    """The layers a stage touches: its config's ``select`` (data, in every file and recipe) narrowed by the verb's
    ``filter_fn`` (code, which only a library call gives: ``prune_(model, cfg, filter_fn=...)``). Each method asks it,
    never the config's ``select`` alone."""

    select: Select
    filter_fn: FilterFn | None = None

    def layers(self, model: nn.Module, kinds=(nn.Conv2d, nn.Linear)) -> list[tuple[str, Layer]]:
        """``select.layers``, then those ``filter_fn(module, fqn)`` accepts."""
        chosen = self.select.layers(model, kinds)
        if self.filter_fn is None:
            return chosen
        return [(n, m) for n, m in chosen if self.filter_fn(m, n)]

    def ends(self, model: nn.Module) -> set[str]:
        return self.select.ends(model)


def check_filter_fn(filter_fn) -> FilterFn | None:
    """``filter_fn`` if it is None or a callable; anything else is a UsageError."""
    if filter_fn is not None and not callable(filter_fn):
        raise UsageError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    return filter_fn


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

    option_prefix: ClassVar[str] = "finetune."

    epochs: float = bounded(float, 0, 10_000, 0.0)
    lr: float = bounded(float, 0, 10, 1e-3, lo_open=True)
    optimizer: str = "adam"
    batch_size: int = bounded(int, 1, 65_536, 64)
    augment: int | None = bounded(int, 0, 512, None)  # and at most the input's side (train.check_augment)
    distill: float | None = bounded(float, 0, 100, None, lo_open=True)
    distill_weight: float = bounded(float, 0, 1, 0.5)
    seed: int = bounded(int, 0, 2**31 - 1, 0)  # a stage adds its round (<= 1000) to it
    weight_decay: float = bounded(float, 0, 1, 0.0)

    def __post_init__(self):
        check_fields(self)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"finetune.optimizer must be 'adam' or 'sgd', got {safe(self.optimizer)}")


_PARTS = {"select": Select, "finetune": FineTune}


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every method config. Subclasses are frozen dataclasses and set ``verb``,
    ``stage_name`` (its name in a recipe), ``search_key`` (the option a recipe may list) and
    ``iterative`` (its search candidates build on each other, as iterative pruning does). A search key
    may name a part's option ("finetune.epochs"); ``also_searched`` names more options a recipe may list
    too (quantize: ``rd_lambda`` beside ``bits``), the candidates then every combination. ``first_fit``: the
    candidates cost more rather than compress more (PTQ, then QAT): the first within budget is kept and the rest
    are not tried.

    ``version``: what ``to_dict`` writes beside the type. A config whose fields change raises it and turns data of
    its older versions into today's fields in ``upgrade``, so that a file written before still reads."""

    verb: ClassVar[str] = ""
    stage_name: ClassVar[str] = ""
    search_key: ClassVar[str] = ""
    also_searched: ClassVar[tuple[str, ...]] = ()  # more options a recipe may list (candidates: every combination)
    iterative: ClassVar[bool] = False  # in a recipe's search, each candidate continues from the previous one
    first_fit: ClassVar[bool] = False  # in a recipe's search, the first candidate within budget ends it
    version: ClassVar[int] = 2  # of its fields as to_dict writes them (1: before select and finetune were parts)
    select: Select  # the two parts every config has (each subclass gives its own default)
    finetune: FineTune

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        name = cls.__name__
        if name in _CONFIG_TYPES and _CONFIG_TYPES[name].__module__ != cls.__module__:
            raise ValueError(f"config type {name!r} is registered twice")
        _CONFIG_TYPES[name] = cls
        own = cls.__dict__.get("__post_init__")
        if own is not None:  # a subclass's own checks (rules across fields) run after the declared ranges

            @functools.wraps(own)
            def post_init(self, _own=own):
                Config.__post_init__(self)
                _own(self)

            cls.__post_init__ = post_init

    def __post_init__(self):
        """Every field's declared ``Bound`` (``check_fields``), and the parts of the right types: what every
        config is checked for, however it was built."""
        for key, part_cls in _PARTS.items():
            v = getattr(self, key, None)
            if not isinstance(v, part_cls):
                raise ValueError(f"{key} must be a table of {part_cls.__name__} options, got {got(v)}")
        check_fields(self)

    def searched(self) -> Any:
        """The value of this config's search key (a part's option when the key is "part.option")."""
        value: Any = self
        for name in self.search_key.split("."):
            value = getattr(value, name)
        return value

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, "version": self.version, **body}

    def changes(self) -> dict[str, Any]:
        """Only the options that differ from the defaults (parts too), for ``from_dict``: what a
        file's history keeps in a few bytes."""
        default = {}
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                default[f.name] = _jsonable(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default[f.name] = _jsonable(f.default_factory())
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.version}
        for k, v in self.to_dict().items():
            if isinstance(v, dict) and isinstance(default.get(k), dict) and k in _PARTS:
                diff = {kk: vv for kk, vv in v.items() if default[k].get(kk) != vv}
                if diff:
                    out[k] = diff
            elif k not in out and default.get(k, object()) != v:
                out[k] = v
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Config:
        """The config ``to_dict`` (or ``changes``) wrote: ``Config.from_dict(c.to_dict()) == c``. Its ``type`` names
        a registered config (``import compress`` registers every built-in one), ``version`` one this compress reads
        (default: the type's own)."""
        d = dict(d)
        name = d.pop("type", None)
        cls = _CONFIG_TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(
                f"unknown config type {safe(name, 40) if isinstance(name, str) else got(name)}; "
                f"known: {', '.join(sorted(_CONFIG_TYPES))}"
            )
        version = d.pop("version", cls.version)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{name} version must be a positive integer, got {got(version)}")
        if version > cls.version:
            raise ValueError(f"{name} version {version} is newer than this compress reads ({cls.version})")
        return cls.from_options(cls.upgrade(d, version))

    @classmethod
    def upgrade(cls, opts: dict[str, Any], version: int) -> dict[str, Any]:
        """``opts`` written by ``version`` of this config, in today's fields (a config that changes its fields
        overrides this; today every version reads as it is)."""
        return opts

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> Config:
        """Build from plain data (a recipe stage, a JSON header): parts may be given as dicts."""
        opts = dict(opts)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(
                f"{cls.stage_name or cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(names))}"
            )
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
