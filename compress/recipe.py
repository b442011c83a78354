"""Recipes: stages of compression, each one method config or a search over one of its options.

A recipe is TOML (see docs/recipes)::

    version = 2
    max_accuracy_drop = 0.5        # optional; the --max-accuracy-drop flag wins over it
    confidence = 1.0               # standard errors of margin in the budget test
    val_fraction = 0.2             # held out of the training data when no validation data is given

    [[stage]]
    method = "threshold"           # a method by name: threshold, l1-filter, channel-union, quantize, factorize
    sparsity = [0.8, 0.9, 0.93]    # a list for the method's search key: candidates, in order
    rounds = 3                     # any other option of the method's config
    finetune = { epochs = 3 }      # the config's parts as tables: finetune, select
    patience = 2                   # a stage option: candidates in a row measured over budget end the search

Every value has one meaning wherever it appears: ``finetune.epochs`` is the stage's total.
``Recipe.to_dict`` writes each stage with its candidates whole (``{"method", "patience", "candidates": [config,
...]}`` under ``stages``), the form a pipeline summary holds; ``Recipe.from_dict`` reads it back to the same recipe.
``resolve`` applies one precedence to every setting: argument > recipe > model metadata > default.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from compress import all_methods  # noqa: F401  (a stage names a method: every built-in one is registered)
from compress.bounds import bounded, check_fields
from compress.config import Config, close_matches, stage_types
from compress.errors import InputError, UsageError, first_line, safe

RECIPE_VERSION = 2  # what to_dict writes; from_dict reads it and earlier ones
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines; a larger file is refused before it is parsed
MAX_STAGES = 32
MAX_CANDIDATES = 64  # values of a search list (each checked by its option's declared range)

_STAGE_KEYS = ("method", "patience")


def resolve(*values, default=None):
    """The first value that is not None: argument > recipe > model metadata > default."""
    return next((v for v in values if v is not None), default)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Args:
    name: the stage's method ("threshold", "quantize", ...).
    candidates: configs tried in order (one: no search).
    patience: candidates in a row whose measured drop alone is over budget that end an iterative
        search (a miss by the noise margin only does not count).
    """

    name: str
    candidates: tuple[Config, ...]
    patience: int = bounded(int, 1, 100, 2)

    def __post_init__(self):
        check_fields(self)

    @property
    def iterative(self) -> bool:
        """Each candidate continues from the previous one (iterative pruning), else from the stage input."""
        return self.candidates[0].iterative

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "stage") -> Stage:
        if not isinstance(d, dict):
            raise UsageError(f"{where}: a stage must be a table, got {type(d).__name__}")
        name = d.get("method")
        types = stage_types()
        known = sorted(types)
        if name is None:
            raise UsageError(f"{where}: a stage names its method (method = ...; known: {', '.join(known)})")
        if not isinstance(name, str) or name not in known:
            hint = close_matches(name, known) if isinstance(name, str) else ""
            raise UsageError(f"{where}: unknown method {name!r}{hint}; known: {', '.join(known)}")
        cfg_cls = types[name]
        if "candidates" in d:
            return cls._from_candidates(d, name, cfg_cls, where)
        opts = {k: v for k, v in d.items() if k not in _STAGE_KEYS}
        option_sets = [opts]
        for key in (cfg_cls.search_key, *cfg_cls.also_searched):  # each listed key multiplies the candidates
            option_sets = [o for base in option_sets for o in _expand(base, key, where)]
        if len(option_sets) > MAX_CANDIDATES:
            raise UsageError(f"{where}: its lists make {len(option_sets):,} candidates; at most {MAX_CANDIDATES}")
        try:
            return cls(name, tuple(cfg_cls.from_options(o) for o in option_sets), d.get("patience", 2))
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where} ({name}): {e}") from e

    @property
    def search_keys(self) -> tuple[str, ...]:
        """The searched options whose values differ among the candidates (the search key alone when none do)."""
        first = self.candidates[0]
        keys = (first.search_key, *first.also_searched)
        varied = tuple(k for k in keys if len({repr(_option(c, k)) for c in self.candidates}) > 1)
        return varied or (first.search_key,)

    @property
    def search_key(self) -> str:
        """What the stage searched, in words: "bits", or "bits, rd_lambda"."""
        return ", ".join(self.search_keys)

    def value(self, cfg: Config) -> Any:
        """A candidate's searched value: the one option's, or a table of each varied option's."""
        keys = self.search_keys
        return _option(cfg, keys[0]) if len(keys) == 1 else {k: _option(cfg, k) for k in keys}

    @classmethod
    def _from_candidates(cls, d: dict[str, Any], name: str, cfg_cls: type[Config], where: str) -> Stage:
        """The form ``to_dict`` writes: every candidate a whole config (``Config.to_dict``), so any stage reads back
        as it was, whatever its candidates differ in."""
        extra = sorted(str(k) for k in set(d) - {"method", "patience", "candidates"})
        if extra:
            raise UsageError(
                f"{where}: a stage of candidates holds method, patience and candidates only, not "
                f"{safe(', '.join(extra), 80)} (a method's options go inside each candidate)"
            )
        found = d["candidates"]
        if not isinstance(found, list) or not found:
            raise UsageError(f"{where}: candidates must be a list of at least one config")
        if len(found) > MAX_CANDIDATES:
            raise UsageError(f"{where}: {len(found):,} candidates; at most {MAX_CANDIDATES}")
        configs = []
        for j, c in enumerate(found):
            if not isinstance(c, dict) or c.get("type") != cfg_cls.__name__:
                raise UsageError(f"{where} candidate {j + 1}: method {name} takes a table of type {cfg_cls.__name__!r}")
            try:
                configs.append(Config.from_dict(c))
            except (TypeError, ValueError) as e:
                raise UsageError(f"{where} candidate {j + 1} ({name}): {e}") from e
        try:
            return cls(name, tuple(configs), d.get("patience", 2))
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where} ({name}): {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Every candidate whole: ``Stage.from_dict(st.to_dict()) == st``."""
        return {"method": self.name, "patience": self.patience, "candidates": [c.to_dict() for c in self.candidates]}


def _option(cfg: Config, key: str) -> Any:
    """The value of ``key`` ("bits", or a part's option "finetune.epochs") in ``cfg``."""
    value: Any = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _expand(opts: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """``opts`` once per value of ``key`` when the recipe lists several (a list), else as it is."""
    part, _, option = key.rpartition(".")  # "finetune.epochs": an option of a part
    found = opts.get(part) if part else opts
    holder: dict = found if isinstance(found, dict) else {}
    values = holder.get(option)
    if not isinstance(values, list):
        return [opts]
    if not values:
        raise UsageError(f"{where}: {key} = [] lists no candidate")
    if len(values) > MAX_CANDIDATES:
        raise UsageError(f"{where}: {key} lists {len(values):,} candidates; at most {MAX_CANDIDATES}")
    return [{**opts, part: {**holder, option: v}} if part else {**opts, key: v} for v in values]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Args:
    stages: the stages, in order.
    max_accuracy_drop: the budget in accuracy points (None: the caller's or the default).
    confidence: standard errors of margin in the budget test (None: default).
    val_fraction: fraction of the training data held out for validation (None: the model's
        metadata, else the default).
    """

    stages: tuple[Stage, ...]
    max_accuracy_drop: float | None = bounded(float, 0, 100, None)
    confidence: float | None = bounded(float, 0, 10, None)
    val_fraction: float | None = bounded(float, 0.01, 0.9, None)

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise UsageError(f"{where} must be a table")
        unknown = sorted(set(d) - {"stage", "stages", "max_accuracy_drop", "confidence", "val_fraction", "version"})
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; a method's options go inside a [[stage]]")
        if "stage" in d and "stages" in d:
            raise UsageError(f"{where}: give its stages once, as [[stage]] tables or as the stages list to_dict writes")
        version = d.get("version", RECIPE_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version > RECIPE_VERSION:
            raise UsageError(f"{where}: version {version!r} is newer than this compress reads ({RECIPE_VERSION})")
        stages = d.get("stage", d.get("stages"))  # a file's [[stage]] tables, or the list to_dict writes
        if not isinstance(stages, list) or not stages:
            raise UsageError(f"{where} needs at least one [[stage]]")
        if len(stages) > MAX_STAGES:
            raise UsageError(f"{where} has {len(stages):,} stages; at most {MAX_STAGES}")
        parsed = tuple(Stage.from_dict(s, f"{where} stage {i + 1}") for i, s in enumerate(stages))
        if any(st.name == "int8" for st in parsed[:-1]):  # its result runs integer kernels no method changes
            raise UsageError(f"{where}: int8 must be the last stage (methods change float models)")
        numbers = {k: d.get(k) for k in ("max_accuracy_drop", "confidence", "val_fraction")}
        try:
            rec = cls(parsed, **numbers)  # the declared ranges
        except ValueError as e:
            raise UsageError(f"{where}: {e}") from e
        floats: dict[str, Any] = {k: float(v) for k, v in numbers.items() if v is not None}  # TOML's 1: 1.0
        return dataclasses.replace(rec, **floats)

    @classmethod
    def load(cls, path) -> Recipe:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # the same parser, published as tomli before it joined the standard library
            import tomli as tomllib

        from compress.filesystem import open_regular

        try:
            with open_regular(path) as f:  # never a FIFO or a device: no read that waits or never ends
                if os.fstat(f.fileno()).st_size > MAX_RECIPE_BYTES:
                    raise UsageError(
                        f"recipe {path} is {os.fstat(f.fileno()).st_size:,} bytes; a recipe is at most "
                        f"{MAX_RECIPE_BYTES:,}"
                    )
                raw = f.read(MAX_RECIPE_BYTES + 1)  # (a device or a pipe has no size: read no more than that)
            if len(raw) > MAX_RECIPE_BYTES:
                raise UsageError(f"recipe {path} is over {MAX_RECIPE_BYTES:,} bytes; a recipe is at most that")
            d = tomllib.loads(raw.decode())
        except InputError as e:  # missing, or not a regular file
            if not os.path.lexists(path):
                raise UsageError(f"recipe {path} not found") from None
            raise UsageError(f"recipe {e}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"recipe {path}: {first_line(e)}") from e
        except RecursionError as e:  # tables or lists nested deeper than Python's parser recurses
            raise UsageError(f"recipe {path}: nested too deeply") from e
        except ValueError as e:  # an integer of more digits than Python converts
            raise UsageError(f"recipe {path}: {first_line(e)}") from e
        return cls.from_dict(d, f"recipe {path}")

    def with_finetune(self, **changes) -> Recipe:
        """The same recipe with ``changes`` to every candidate's fine-tuning (``distill=4``)."""

        def one(c: Config) -> Config:
            return dataclasses.replace(c, finetune=dataclasses.replace(c.finetune, **changes))

        return dataclasses.replace(
            self,
            stages=tuple(
                dataclasses.replace(st, candidates=tuple(one(c) for c in st.candidates)) for st in self.stages
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """What a summary and a checkpoint's fingerprint hold: ``Recipe.from_dict(r.to_dict()) == r``."""
        return {
            "version": RECIPE_VERSION,
            "max_accuracy_drop": self.max_accuracy_drop,
            "confidence": self.confidence,
            "val_fraction": self.val_fraction,
            "stages": [s.to_dict() for s in self.stages],
        }


# Han et al., Deep Compression (ICLR 2016), with per-layer sparsity from a sensitivity analysis and
# Zhu & Gupta's gradual schedule: iterative threshold pruning, each candidate going on from the last
# with 12 epochs of fine-tuning over 3 rounds; then k-means weight sharing with centroid fine-tuning
# (conv 8 / fc 5 bits as in the paper, searched downwards).
DEFAULT_RECIPE = Recipe.from_dict(
    {
        "stage": [
            {
                "method": "threshold",
                "sparsity": [0.9, 0.95, 0.97, 0.98, 0.985, 0.99],
                "rounds": 3,
                "finetune": {"epochs": 12},
            },
            {
                "method": "quantize",
                "scheme": "kmeans",
                "bits": [
                    {"conv": 8, "linear": 5},
                    {"conv": 6, "linear": 4},
                    {"conv": 5, "linear": 4},
                    {"conv": 4, "linear": 3},
                    {"conv": 4, "linear": 2},
                ],
                "finetune": {"epochs": 1},
            },
        ]
    },
    "default recipe",
)
