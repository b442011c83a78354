"""A method's command-line options, made from its config's dataclass fields.

Each field of a config (and of its ``select`` and ``finetune`` parts) becomes an option: ``--field-name``, its
type, default and choices from the field (``Bound``, ``metadata["choices"]``), its help from the ``Args:``
docstring. A per-layer field is written ``0.5`` or ``conv=0.6,linear=0.95``. ``Field`` says where a command
spells one differently; ``HIDDEN`` (and a command's own list) names the fields left to ``--set`` and recipes.
A command of several methods (``prune --method``) shows which methods an option is for, and each method's
default where they differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

from compress.cli.options import METHOD, TRAINING, flag, option


@dataclasses.dataclass(frozen=True)
class Field:
    """How a command spells one config field, where the rule does not fit."""

    flag: str | None = None  # the option's name (default: --field-name)
    aliases: tuple[str, ...] = ()
    invert: bool = False  # a flag that sets the field to False (--per-tensor: per_channel=False)
    parse: Callable | None = None  # text or number -> the field's value
    help: str | None = None  # instead of the Args: text
    note: str = ""  # after the help text
    kw: dict = dataclasses.field(default_factory=dict)  # more typer.Option arguments (min=...)


# The parts every config has: how the commands spell them, and what they leave to --set.
PARTS: dict[str, dict[str, Field]] = {
    "select": {
        "names": Field(
            "--layers",
            parse=lambda t: _patterns(t),
            help="Only these layers: comma-separated glob patterns of layer names (fc*,layer3.*).",
        ),
        "exclude": Field(parse=lambda t: _patterns(t), help="Leave these layers alone: comma-separated glob patterns."),
    },
    "finetune": {"epochs": Field(kw={"min": 0}), "distill": Field(kw={"min": 0.01})},
}
HIDDEN = {
    "select": {"types", "filter_fn", "spare_first_last"},
    "finetune": {"optimizer", "batch_size", "augment", "distill_weight", "seed", "weight_decay"},
}
_PANEL = {"select": METHOD, "finetune": TRAINING}


def args_doc(cls: type) -> dict[str, str]:
    """The ``Args:`` section of a class's docstring: field name -> its text, on one line."""
    doc = inspect.getdoc(cls) or ""
    if "Args:" not in doc:
        return {}
    lines = [line for line in doc.split("Args:", 1)[1].splitlines()]
    body = [line for line in lines if line.strip()]
    indent = len(body[0]) - len(body[0].lstrip()) if body else 0  # a field's line; deeper lines go on with it
    out: dict[str, str] = {}
    names: list[str] = []
    for line in lines:
        m = re.match(r"^(\w+(?:, \w+)*): (.*)$", line[indent:]) if line[:indent].strip() == "" else None
        if m and len(line) - len(line.lstrip()) == indent:
            names = m.group(1).split(", ")
            for n in names:
                out[n] = m.group(2).strip()
        elif names and line.strip():
            for n in names:
                out[n] += " " + line.strip()
        elif not line.strip() and out:
            names = []
    return {k: _cli_text(v) for k, v in out.items()}


def _cli_text(text: str) -> str:
    """Docstring text as help: ``code`` without its backticks, and square brackets that rich does not read as
    markup; a capital first letter and a closing stop."""
    text = text.replace("``", "").replace("[", r"\[")
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _patterns(text: str | None) -> tuple:
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else ()


def _mapping(cast: Callable, flag_name: str) -> Callable:
    def parse(text):
        from compress.cli.harness import parse_mapping

        return parse_mapping(text, flag_name, cast=cast)

    return parse


def number(text: str):
    """'8' -> 8 (a count), '0.5' -> 0.5 (a fraction)."""
    text = text.strip()
    return int(text) if text.isdigit() else float(text)


@dataclasses.dataclass
class _Opt:
    """One generated option: the field it sets in each config that has it."""

    name: str
    part: str | None  # None: the config's own field; else "select" / "finetune"
    owners: dict[str, type]  # method name -> config class having the field
    spec: Field
    param: inspect.Parameter | None = None

    def parse(self, raw):
        if raw is None:
            return None
        if self.spec.invert:
            return not raw if raw else None  # the flag given: False; not given: the config's default
        return self.spec.parse(raw) if self.spec.parse else raw


class ConfigOptions:
    """The options generated from the configs of one command (``methods``: name -> config class, in the order
    shown); ``fields`` respells some, ``hidden`` leaves some to --set."""

    def __init__(
        self,
        methods: dict[str, type],
        fields: dict[str, Field] | None = None,
        hidden: set[str] | frozenset = frozenset(),
        panel: str = METHOD,
    ):
        self.methods, self.fields, self.hidden, self.panel = methods, fields or {}, set(hidden), panel
        self.opts: dict[str, _Opt] = {}
        for method, cls in methods.items():
            for f in dataclasses.fields(cls):
                if f.name in ("select", "finetune"):
                    part = _part_class(cls, f.name)
                    for pf in dataclasses.fields(part):
                        if pf.name not in HIDDEN[f.name]:
                            spec = self.fields.get(pf.name) or PARTS[f.name].get(pf.name, Field())
                            self._add(pf.name, f.name, method, cls, spec)
                elif f.name not in self.hidden:
                    self._add(f.name, None, method, cls, self.fields.get(f.name, Field()))
        for o in self.opts.values():
            o.param = self._param(o)

    def _add(self, name, part, method, cls, spec) -> None:
        o = self.opts.setdefault(name, _Opt(name, part, {}, spec))
        o.owners[method] = cls

    def params(self) -> list[inspect.Parameter]:
        return [o.param for o in self.opts.values() if o.param is not None]

    def exposed(self, cls: type) -> set[str]:
        """The fields of ``cls`` (``part.name`` for a part's) these options set."""
        return {
            o.name if o.part is None else f"{o.part}.{o.name}" for o in self.opts.values() if cls in o.owners.values()
        }

    def default(self, method: str, name: str) -> Any:
        """The default of field ``name`` ("part.name" for a part's) in ``method``'s config."""
        part, _, field = name.rpartition(".")
        return _default_of(self.methods[method], part or None, field)

    def config(self, method: str, kw: dict, **fixed):
        """The config of ``method`` from the command's option values ``kw``: an option not given (None) leaves
        the config's default; ``fixed`` values are set as given (None too). A bad value is a usage error."""
        from compress.cli.common import make_config

        cls: Any = self.methods[method]
        own: dict[str, Any] = {}
        parts: dict[str, dict] = {"select": {}, "finetune": {}}
        for o in self.opts.values():
            if method not in o.owners:
                continue
            v = o.parse(kw.get(o.name))
            if v is not None:
                (own if o.part is None else parts[o.part])[o.name] = v
        own.update(fixed)
        for key, values in parts.items():
            own[key] = make_config(cls.part, key, **values)
        return make_config(cls, **own)

    # ------------------------------------------------------------------------- one option
    def _param(self, o: _Opt) -> inspect.Parameter | None:
        cls = next(iter(o.owners.values()))
        f = _field(cls if o.part is None else _part_class(cls, o.part), o.name)
        bound = f.metadata.get("bound")
        choices = f.metadata.get("choices")
        defaults = {m: _default_of(c, o.part, o.name) for m, c in o.owners.items()}
        spec = o.spec
        flag_name = spec.flag or "--" + o.name.replace("_", "-")
        help_text = spec.help or args_doc(cls if o.part is None else _part_class(cls, o.part)).get(o.name, "")
        if len(o.owners) < len(self.methods):  # an option of some of the methods: say which
            help_text = f"{', '.join(o.owners)}: {help_text}"
        panel = _PANEL.get(o.part or "", self.panel)
        same = len({repr(d) for d in defaults.values()}) == 1
        default = next(iter(defaults.values())) if same else None
        if not same:
            help_text += " (default: " + "; ".join(f"{m} {_show(d)}" for m, d in defaults.items()) + ")"
        if spec.note:
            help_text += " " + spec.note
        kind: Any
        if spec.invert:
            return _kw(o.name, Annotated[bool, flag(flag_name, *spec.aliases, help=help_text, panel=panel)], False)
        if bound is not None and bound.per_layer:
            kind, cast = str, {int: int}.get(bound.kind, number if bound.count else float)
            if spec.parse is None:
                o.spec = spec = dataclasses.replace(spec, parse=_mapping(cast, flag_name))
            default = None if default is None else _show(default)
            help_text += " Per layer: NAME=VALUE,... (a layer, conv, linear or _default)."
        elif bound is not None and bound.kind is bool or isinstance(default, bool):
            return _kw(
                o.name, Annotated[bool, flag(flag_name, *spec.aliases, help=help_text, panel=panel)], bool(default)
            )
        elif choices is not None:  # a registry's names as they are now, as copies: the value given is then its own
            # string, as one read from the command line is, not the registry's (pickled into a file's history, the
            # registry's own string would be written as a reference to its other use: other bytes)
            kind = Literal.__getitem__(tuple(str(c).encode().decode() for c in choices))
        elif bound is not None and bound.many:
            kind = str
            default = None
        else:
            kind = bound.kind if bound is not None else str
        if default is None:
            kind = Optional[kind]  # noqa: UP045  (built at run time for Typer: typing.Optional, which every Typer version reads)
        shown = spec.kw.get("show_default", same and default is not None)
        kw = {k: v for k, v in spec.kw.items() if k != "show_default"}
        return _kw(
            o.name,
            Annotated[kind, option(flag_name, *spec.aliases, help=help_text, panel=panel, show_default=shown, **kw)],
            default,
        )


def _kw(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def _part_class(cls: type, key: str) -> type:
    return type(_default_of(cls, None, key))


def _default_of(cls: type, part: str | None, name: str) -> Any:
    """The default of field ``name`` of ``cls`` (of its part ``part``), default factories called."""
    f = _field(cls, part or name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return getattr(value, name) if part else value


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def methods_of(verb: str) -> dict[str, type]:
    """Stage name -> config class of every registered method of ``verb``, in registration order."""
    from compress.config import stage_types

    return {name: cls for name, cls in stage_types().items() if cls.verb == verb}
