"""What a config field accepts, declared on the field and checked wherever the value comes from.

``bounded`` declares a dataclass field with its ``Bound`` (kind and range); ``check_fields`` checks every declared
field of an object; ``bound_of`` reads one back (the CLI and the recipe checker say the range in their errors).
Split from compress.config, whose configs are built from these fields.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from compress.errors import safe

MAX_LAYER_KEYS = 10_000  # entries of a per-layer table ({fqn | "conv" | "linear" | "_default": value})


@dataclasses.dataclass(frozen=True)
class Bound:
    """What one config field accepts, declared on the field (``bounded``) and checked by ``check_fields``
    wherever the value comes from: the library, a CLI option, ``--set``, a recipe or a file's header.

    Args:
        kind: int (integral, not bool; 3.0 is refused), float (finite; an int is fine), bool, or str.
        lo, hi: the range of a number, or the length of a str.
        lo_open, hi_open: the bound itself is excluded.
        optional: None is allowed (the default is chosen elsewhere).
        per_layer: a table of such values keyed by layer FQN, "conv", "linear", "_default" is allowed too.
        count: a float field where an int means a count instead, in this range (``amount`` in torch's
            prune: a float is a fraction, an int a count).
        many: a tuple of up to this many values is what the field holds (0: one value).
    """

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False
    per_layer: bool = False
    count: tuple[int, int] | None = None
    many: int = 0

    def text(self) -> str:
        """The allowed range in words: 'in [0, 1)', '> 0 and <= 10'."""
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo_open:  # "(0, 10]" is easily misread: an open lower bound is said in words
            return f"> {lo} and {'<' if self.hi_open else '<='} {hi}"
        return f"in [{lo}, {hi}{')' if self.hi_open else ']'}"

    def check(self, v, name: str) -> None:
        """Raise ValueError (one line naming ``name`` and the range) unless ``v`` is allowed."""
        if v is None and self.optional:
            return
        if self.many:
            if not isinstance(v, tuple) or len(v) > self.many:
                raise ValueError(
                    f"{name} must be a list of at most {self.many} {self._what(plural=True)}, got {got(v)}"
                )
            for x in v:
                self._one(x, name)
            return
        if self.per_layer and isinstance(v, dict):
            if len(v) > MAX_LAYER_KEYS:
                raise ValueError(f"{name}: a per-layer table has at most {MAX_LAYER_KEYS} entries, got {len(v):,}")
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"{name}: per-layer keys are layer names, got {safe(k)}")
                self._one(x, f"{name}[{safe(k, 40)}]")
            return
        self._one(v, name)

    def _one(self, v, name: str) -> None:
        if self.kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {got(v)}")
            return
        if self.kind is str:
            if not isinstance(v, str) or not self.lo <= len(v) <= self.hi:
                raise ValueError(
                    f"{name} must be strings of {_num(self.lo)} to {_num(self.hi)} characters, got {got(v)}"
                )
            return
        integral = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if self.count is not None and integral:  # an int is a count
            lo, hi = self.count
            if not lo <= v <= hi:
                raise ValueError(f"{name} as a count (an integer) must be in [{lo}, {hi}], got {got(v)}")
            return
        if self.kind is int and not integral:
            hint = f" (a float: write {int(v)})" if isinstance(v, float) and v.is_integer() else ""
            raise ValueError(f"{name} must be an integer {self.text()}, got {got(v)}{hint}")
        if not integral and (not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)):
            raise ValueError(f"{name} must be a number {self.text()}{self._or_count()}, got {got(v)}")
        below = v < self.lo or (self.lo_open and v == self.lo)
        above = v > self.hi or (self.hi_open and v == self.hi)
        if below or above:
            raise ValueError(f"{name} must be {self.text()}{self._or_count()}, got {got(v)}")

    def _or_count(self) -> str:
        return f" (or an integer count in [{self.count[0]}, {self.count[1]}])" if self.count else ""

    def _what(self, plural: bool = False) -> str:
        s = "s" if plural else ""
        return {bool: f"boolean{s}", str: f"string{s}", int: f"integer{s}"}.get(self.kind, f"number{s}")


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def got(v) -> str:
    """A bad value, fit to quote in one line: a list or table is said by its size, not printed whole."""
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v):,}"
    if isinstance(v, dict):
        return f"a table of {len(v):,} entries"
    return safe(v) if isinstance(v, str) else safe(v, 40)[1:-1]


def bounded(kind: type, lo: float, hi: float, default: Any, **kw) -> Any:
    """A dataclass field with its declared ``Bound`` (None as the default makes None allowed):
    ``rounds: int = bounded(int, 1, 1000, 3)``."""
    bound = Bound(kind, lo, hi, optional=kw.pop("optional", default is None), **kw)
    return dataclasses.field(default=default, metadata={"bound": bound})


def check_fields(obj) -> None:
    """Check every field of the dataclass ``obj`` that declares a ``Bound``; ValueError names the first bad one
    (as ``prefix + name``, the prefix being the class's ``option_prefix``: "finetune.")."""
    prefix = getattr(obj, "option_prefix", "")
    for f in dataclasses.fields(obj):
        bound = f.metadata.get("bound")
        if bound is not None:
            bound.check(getattr(obj, f.name), prefix + f.name)


def bound_of(cls, name: str) -> Bound | None:
    """The declared ``Bound`` of field ``name`` of the dataclass ``cls`` (None: none declared)."""
    return {f.name: f.metadata.get("bound") for f in dataclasses.fields(cls)}.get(name)
