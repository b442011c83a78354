"""Options shared by the commands, declared once: each an ``Annotated`` alias (its flag, help and panel), and
the groups a command takes whole (``ModelOptions``, ``DataOptions``, ``OutputOptions``, ``RunOptions``).

``expand`` turns a command function's group parameters into the groups' options for Typer and hands the
command the filled groups; ``LazyCommand`` builds a command's options only when the command is used (options
generated from configs import the configs, and torch with them: ``compress --help`` does not).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

MODEL, DATA, METHOD, TRAINING, OUTPUT = "Model", "Data", "Method", "Training", "Output"  # the help's panels


def option(*flags: str, help: str, panel: str | None = None, **kw: Any) -> Any:
    """A Typer option in its help panel; a bool option is a flag, shown without a type label."""
    return typer.Option(*flags, help=help, rich_help_panel=panel, **kw)


def flag(*flags: str, help: str, panel: str | None = None) -> Any:
    """An on/off flag: it takes no value, so its help shows no type (Typer would write "<bool>")."""
    return typer.Option(*flags, help=help, rich_help_panel=panel, metavar="")


# --------------------------------------------------------------------------------------- the options
ModelArg = Annotated[
    str,
    typer.Argument(help="Model file: compress output, TorchScript, state_dict (+ --arch), .cpz.", show_default=False),
]
ArchOpt = Annotated[
    str | None,
    option(
        "--arch",
        panel=MODEL,
        help="Architecture for a state_dict, or the code "
        "of your own classes in a file compress wrote: module:callable, "
        "path/to/file.py:callable or zoo:NAME.",
    ),
]
TrustOpt = Annotated[
    bool, flag("--trust-pickle", panel=MODEL, help="Allow unpickling a file that runs code. Only for files you trust.")
]
InputShapeOpt = Annotated[str | None, option("--input-shape", panel=MODEL, help="Input shape, e.g. 1,1,28,28.")]

OutOpt = Annotated[str, option("--output", "-o", panel=OUTPUT, help="Output file.", show_default=False)]
ForceOpt = Annotated[bool, flag("--force", "-f", panel=OUTPUT, help="Overwrite an existing output file.")]


class Coder(str, enum.Enum):
    auto = "auto"
    huffman = "huffman"
    context = "context"


CoderOpt = Annotated[
    Coder,
    option(
        "--coder",
        panel=OUTPUT,
        help="How a .cpz codes its quantized tensors: auto (each stream in its smallest coding, Huffman or "
        "adaptive ANS coding; ANS only up to 262,144 symbols a stream, as it decodes ~7x slower), huffman "
        "(as compress before ANS coding, the same bytes) or context "
        "(ANS coding wherever it applies).",
    ),
]
JsonOpt = Annotated[
    str | None, option("--json", panel=OUTPUT, help="Also write the result as JSON to this file ('-' for stdout).")
]
ReportOpt = Annotated[
    str | None, option("--report", panel=OUTPUT, help="Write JSON, Markdown, HTML and plots to this folder.")
]
NoLatencyOpt = Annotated[bool, flag("--no-latency", panel=OUTPUT, help="Skip latency timing.")]
ThreadsOpt = Annotated[
    int | None,
    option(
        "--threads", min=1, panel=OUTPUT, help="Threads to run and time on (default: torch's for work, 2 for timing)."
    ),
]

DataOpt = Annotated[
    str | None,
    option(
        "--data",
        panel=DATA,
        help="Evaluation data: mnist5k, digits, folder:DIR "
        "(a subfolder of images per class), DIR of IDX files, PATH.npz, "
        "module:function returning (x, y), a Dataset or a DataLoader; "
        "options after '?' (mnist5k?size=32, folder:train?resize=36&crop=32).",
    ),
]
TrainDataOpt = Annotated[
    str | None,
    option(
        "--train-data",
        panel=DATA,
        help="Fine-tuning data spec (see --data); "
        "20% is held out for validation (or the split the model was trained "
        "with).",
    ),
]
TestDataOpt = Annotated[
    str | None,
    option("--test-data", panel=DATA, help="Extra held-out data to report accuracy on (e.g. ../shared/data/mnist)."),
]
ValDataOpt = Annotated[
    str | None,
    option(
        "--val-data",
        panel=DATA,
        help="Validation data the model was not trained on (e.g. folder:val); default: 20% held out of --train-data.",
    ),
]
CalibDataOpt = Annotated[str | None, option("--calib-data", panel=DATA, help="Calibration data spec.")]
LossOpt = Annotated[
    str | None,
    option(
        "--loss",
        panel=DATA,
        help="Your loss, module:fn or file.py:fn, called as fn(outputs, targets) (default: cross-entropy).",
    ),
]
MetricOpt = Annotated[
    str | None,
    option(
        "--metric",
        panel=DATA,
        help="How the model is scored: top1 (default), "
        "top5, or module:fn called as fn(outputs, targets) -> per-sample scores "
        "or one number per batch, higher is better.",
    ),
]
WorkersOpt = Annotated[
    int | None,
    option(
        "--workers",
        min=0,
        max=64,
        panel=DATA,
        help="Loader processes reading the data ahead of training (default 0: none).",
    ),
]

DistillOpt = Annotated[
    float | None,
    option(
        "--distill",
        min=0.01,
        panel=TRAINING,
        help="Fine-tune against the input model's outputs too (knowledge distillation) at this temperature, e.g. 4.",
    ),
]
SeedOpt = Annotated[int, option("--seed", panel=TRAINING, help="Random seed.")]
SetOpt = Annotated[
    list[str] | None,
    option(
        "--set",
        panel=METHOD,
        help="Any option of the method's config, as "
        "in a recipe: --set rounds=4, --set finetune.weight_decay=1e-4, "
        "--set 'select.exclude=[\"fc1\"]' (TOML values).",
    ),
]


# --------------------------------------------------------------------------------------- the groups
@dataclasses.dataclass
class ModelOptions:
    """How the model file is read."""

    arch: ArchOpt = None
    trust_pickle: TrustOpt = False
    input_shape: InputShapeOpt = None

    def load(self):
        """The ``model_io.LoadOptions`` these say."""
        from compress.cli.common import load_options

        return load_options(self.arch, self.trust_pickle, self.input_shape)


@dataclasses.dataclass
class DataOptions:
    """The data of a command that changes a model: what it trains, is judged and scored on, and how."""

    train_data: TrainDataOpt = None
    val_data: ValDataOpt = None
    test_data: TestDataOpt = None
    loss: LossOpt = None
    metric: MetricOpt = None
    workers: WorkersOpt = None


@dataclasses.dataclass
class OutputOptions:
    """What a command that changes a model writes: the model, and a JSON result or a report folder."""

    output: OutOpt
    force: ForceOpt = False
    json_out: JsonOpt = None
    report: ReportOpt = None


@dataclasses.dataclass
class RunOptions:
    """How the work runs and is timed."""

    threads: ThreadsOpt = None
    no_latency: NoLatencyOpt = False


# --------------------------------------------------------------------------------------- to Typer
def expand(fn: Callable, extra: list[inspect.Parameter] | None = None) -> Callable:
    """``fn`` as Typer should see it: a parameter annotated with a group (a dataclass) becomes the group's options,
    and ``fn`` is called with the filled group; ``extra`` options (generated ones) go to ``fn``'s ``**kw``."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        kind = hints.get(name, p.annotation)
        if dataclasses.is_dataclass(kind):
            groups[name] = kind  # type: ignore[assignment]
            own = typing.get_type_hints(kind, include_extras=True)
            params += [
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=own[f.name],
                    default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
                )
                for f in dataclasses.fields(kind)
            ]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))
    params += extra or []
    params.sort(key=_panel_rank)  # the help shows its panels in the order they first appear
    seen = [p.name for p in params]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise TypeError(f"{fn.__name__}: option(s) {', '.join(sorted(dup))} declared twice")

    def command(**kw: Any) -> Any:
        for name, group in groups.items():
            kw[name] = group(**{f.name: kw.pop(f.name) for f in dataclasses.fields(group)})
        return fn(**kw)

    command.__name__, command.__doc__, command.__module__ = fn.__name__, fn.__doc__, fn.__module__
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


_PANELS = (MODEL, DATA, METHOD, TRAINING, OUTPUT)


def _panel_rank(p: inspect.Parameter) -> int:
    info = next((a for a in getattr(p.annotation, "__metadata__", ()) if hasattr(a, "rich_help_panel")), None)
    if info is None or type(info).__name__ == "ArgumentInfo":
        return -1
    panel = info.rich_help_panel
    return _PANELS.index(panel) if panel in _PANELS else len(_PANELS)


def grouped(fn: Callable) -> Callable:
    """Decorator: ``expand(fn)`` (a command with option groups and no generated options)."""
    return expand(fn)


def lazy(options: Callable[[], list[inspect.Parameter]]) -> Callable[[Callable], Callable]:
    """Decorator for a command registered with ``cls=LazyCommand``: its options, ``expand(fn, options())``, are
    made the first time the command is parsed or its help shown."""

    def deco(fn: Callable) -> Callable:
        def placeholder() -> None:  # what Typer sees at start: a name and a docstring
            raise AssertionError("a lazy command runs through the command LazyCommand builds")

        placeholder.__name__, placeholder.__doc__, placeholder.__module__ = fn.__name__, fn.__doc__, fn.__module__
        placeholder.build = lambda: expand(fn, options())  # type: ignore[attr-defined]
        return placeholder

    return deco


def _no_type_label(option: Any) -> Any:
    if option is not None:
        option.metavar = ""  # -h/--help is a flag: no "<bool>" after it
    return option


class Command(TyperCommand):
    """A compress command: its -h/--help shows no type label, as no flag does."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_type_label(super().get_help_option(ctx))


class Group(TyperGroup):
    """A group of commands (the root, ``zoo``): its -h/--help shows no type label."""

    def get_help_option(self, ctx: Any) -> Any:
        return _no_type_label(super().get_help_option(ctx))


class LazyCommand(Command):
    """A command whose options are made when first needed (see ``lazy``)."""

    def __init__(self, *, callback: Callable, **kw: Any) -> None:
        self._build = callback.build  # type: ignore[attr-defined]  # copied by Typer's wrapper from ``lazy``
        self._made: list | None = None
        super().__init__(callback=callback, **kw)

    @property
    def params(self) -> list:
        if self._made is None:
            from typer.main import get_command_from_info
            from typer.models import CommandInfo

            real = get_command_from_info(
                CommandInfo(name=self.name, callback=self._build()),
                pretty_exceptions_short=False,
                rich_markup_mode=self.rich_markup_mode,
            )
            self._made, self.callback = real.params, real.callback
        return self._made

    @params.setter
    def params(self, value: list) -> None:  # click's __init__ sets the (empty) list of the placeholder
        pass
