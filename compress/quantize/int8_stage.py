"""The ``int8`` method: static INT8 of weights and activations that PyTorch executes, post-training (PTQ) or
quantization-aware (QAT), under the one method lifecycle (``compress.method``).

``lower_int8(model, Int8Config(), calib_data=calib)`` calibrates activation ranges on the data and returns
an ``Int8Model``; ``Int8Config(finetune=FineTune(epochs=1))`` trains first with fake quantization
(straight-through gradients, conv-bn folded, moving-average ranges) and then converts: the accuracy PTQ
loses to rounding is trained back. The float model given is left as it was; the INT8 model is returned
(it is a new model, not the input changed in place). In a recipe, ``method = "int8"`` with
``finetune = { epochs = [0, 1] }`` tries PTQ and trains only when PTQ misses the budget.

Under an accuracy budget (``Int8Config(max_accuracy_drop=0.5)``, or the pipeline's when the stage runs inside
``compress pipeline``), PTQ judges the INT8 model on the validation data and, while it misses the budget, keeps
the most costly layers float, up to ``max_float_layers`` of them (``int8_fallback.py``: how they are ranked and
what that costs).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn as nn

from compress.bounds import bounded
from compress.config import Config, FineTune, Select, register_method
from compress.data import Data, as_data, batches, check_fits
from compress.errors import InputError, UsageError, first_line, safe
from compress.method import Context, Method, _ctx, needs_data, run
from compress.quantize import int8, int8_fallback, int8_file, pt2e  # (int8_file: also an Int8Model's writer, size)
from compress.scoring import Judge

ENGINES = ("auto", "pt2e", "fx")
OBSERVER_CHOICES = ("auto", *pt2e.OBSERVERS)
HELD_OUT = 4  # auto observer: 1/HELD_OUT of the calibration samples judge the candidates


@dataclasses.dataclass(frozen=True)
class Int8Config(Config):
    """Args:
    observer: how activation ranges are set from the calibration data: "auto" (each of the others is tried
        on three quarters of the calibration samples, and the one whose outputs are closest to FP32 on the
        last quarter is kept), "histogram" (the range with the least L2 error), "minmax", "percentile"
        (``percentile`` of each batch's values) or "mse" (the clipped range with the least error; PT2E only).
    engine: "auto" (PT2E where torchao and a C++ compiler are at hand and the model exports, else FX),
        "pt2e" (torchao's flow, compiled by inductor) or "fx" (torch.ao's FX flow, deprecated by PyTorch).
    percentile: the percentile of the "percentile" observer (99.9 .. 100).
    calib_samples: calibration samples read from the stage's data.
    select: the layers that run INT8; every other Conv2d / Linear stays float (``Select.exclude``
        keeps a sensitive stem or classifier float).
    finetune: ``epochs`` > 0: quantization-aware training for that many epochs before the conversion;
        batch-norm statistics and activation ranges are frozen for the last ``freeze`` of it.
    freeze: the share of the QAT steps, at the end, with batch-norm statistics and ranges frozen.
    max_accuracy_drop: PTQ under an accuracy budget, in points of the metric on the validation data (the drop
        against the float model plus one standard error, as the pipeline judges): while it is missed, the most
        costly layer is kept float and the model made again, up to max_float_layers of them. None: no budget of
        its own (in a pipeline: the pipeline's).
    max_float_layers: at most this many layers kept float by the budget (besides select.exclude).
    """

    verb = "quantize"
    stage_name = "int8"
    search_key = "finetune.epochs"
    first_fit = True  # candidates cost more, not compress more: the first within budget is kept

    observer: str = dataclasses.field(default="auto", metadata={"choices": OBSERVER_CHOICES})
    engine: str = dataclasses.field(default="auto", metadata={"choices": ENGINES})
    percentile: float = bounded(float, 99, 100, int8.PERCENTILE)
    calib_samples: int = bounded(int, 1, 1 << 20, int8.CALIB_SAMPLES)
    freeze: float = bounded(float, 0, 1, 0.3, hi_open=True)
    select: Select = dataclasses.field(default_factory=lambda: Select(spare_first_last=False))
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(epochs=0.0, lr=1e-4, augment=0))
    max_accuracy_drop: float | None = bounded(float, 0, 100, None)
    max_float_layers: int = bounded(int, 0, int8_file.MAX_FALLBACK, 4)

    def __post_init__(self):
        if self.observer not in OBSERVER_CHOICES:
            raise ValueError(f"observer must be one of {', '.join(OBSERVER_CHOICES)}, got {safe(self.observer)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {safe(self.engine)}")
        if self.engine == "fx" and self.observer == "mse":
            raise ValueError('observer "mse" runs on the PT2E engine only')


class _Exported(nn.Module):
    """A prepared PT2E graph the training loop can switch between train and eval (an exported graph has no
    switch of its own: torchao's moves batch norm and dropout); once ``frozen``, it stays in eval mode (batch
    norm statistics no longer move)."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self.frozen = False

    def forward(self, x):
        return self.graph(x)

    def train(self, mode: bool = True):
        self.training = mode
        pt2e.train_mode(self.graph, mode and not self.frozen)  # type: ignore[arg-type]
        return self


@register_method(Int8Config)
class Int8Lowering(Method):
    """``attach`` prepares a copy of the model (observers; QAT: fake quantization) on the PT2E engine (torchao's
    flow: torch.export, the x86 inductor quantizer) or, where that cannot run, torch.ao's FX flow, and for PTQ
    calibrates it (``observer="auto"``: every observer tried, the closest to FP32 kept); the library's loop (or
    the user's) trains the QAT copy; ``finalize`` converts it to the ``Int8Model`` PyTorch runs as integers."""

    config: Int8Config
    in_place = False  # its result is a new Int8Model: lower_int8, not quantize_

    def attach(self) -> None:
        cfg, ctx = self.config, self.ctx
        if self.qat and ctx.train is None:
            raise needs_data("int8 quantization-aware training")
        self.calib = ctx.train if self.qat or ctx.calib is None else ctx.calib  # QAT: ranges from its batches
        if self.calib is None:
            raise UsageError(
                "INT8 activations need calibration data (--calib-data SPEC; Context(calib=...) or "
                "train=...): none was given"
            )
        check_fits(self.model, self.calib, labels_needed=False)  # its samples are what the model takes
        if not self.qat:
            int8.check_calibration(self.calib)  # finite, and enough of it: before any work
        if cfg.max_accuracy_drop is not None and ctx.val is None:
            raise UsageError(
                "max_accuracy_drop (--max-accuracy-drop) is judged on validation data: give --train-data (a share "
                "is held out) or --val-data too; Context(val=...)"
            )
        if cfg.select.exclude:  # the layers kept float are named on purpose: a pattern that names none is an error
            Select(names=cfg.select.exclude, spare_first_last=False).layers(self.model)
        chosen = {n for n, _ in self.select.layers(self.model)}
        self.kept = tuple(
            sorted(
                n for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in chosen
            )
        )
        self.shape = ctx.shape(self.model)
        self.float_model = self.model
        self.observer_errors: dict[str, float] = {}
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (held-out calibration batch, its FP32 outputs)
        self.engine, self.fallback = self._engine()
        if self.engine == "pt2e":
            self.backend = "x86"
            self.prepared = self._prepare_pt2e()
        else:
            self.backend = int8.backend()
            self.prepared = self._prepare_fx()
        self.model = _Exported(self.prepared) if self.engine == "pt2e" and self.qat else self.prepared
        self.steps, self.frozen = 0, False
        if self.qat:
            if ctx.device:  # trained where the user trains; converted on the CPU
                self.model.to(ctx.device)
            per_epoch = math.ceil(len(ctx.train) / cfg.finetune.batch_size)
            self.freeze_at = int(per_epoch * cfg.finetune.epochs * (1 - cfg.freeze))

    def _engine(self) -> tuple[str, str | None]:
        """The engine that runs, and why PT2E does not (None when it does)."""
        want = self.config.engine
        if want == "fx":
            return "fx", None
        reason = pt2e.unavailable()
        if reason is None:
            work = copy.deepcopy(self.float_model).cpu().eval()
            self.native = int8.native_activations(work)
            try:
                self.exported = pt2e.export(work, self.shape)
            except Exception as e:
                reason = f"torch.export cannot capture the model ({type(e).__name__}: {safe(first_line(e, 120))})"
        if reason is not None and want == "pt2e":
            raise UsageError(f"the PT2E engine cannot run here: {reason}")
        return ("fx", reason) if reason is not None else ("pt2e", None)

    def _make(self, observer: str, kept: tuple[str, ...] | None = None):
        """A prepared copy of the float model on this engine, ``kept`` (default: the config's) left float."""
        kept = self.kept if kept is None else kept
        if self.engine == "pt2e":
            return pt2e.prepare(
                self.float_model,
                self.shape,
                observer,
                kept,
                self.qat,
                self.config.percentile,
                exported=self.exported,
            )
        return int8.prepare(
            self.float_model, self.shape, observer, kept, self.backend, self.qat, self.config.percentile
        )

    def _convert(self, prepared: torch.fx.GraphModule) -> nn.Module:
        """The converted graph of a calibrated prepared model (which it consumes)."""
        with int8._quiet():
            return pt2e.convert(prepared) if self.engine == "pt2e" else int8.convert_graph(prepared)

    def _prepare_pt2e(self):
        cfg = self.config
        try:
            if self.qat:
                self.seen = 0  # QAT: the moving averages learn the ranges from the training batches
                self.observer = "moving average (QAT)"
                return self._make("minmax")
            return self._calibrated(pt2e.OBSERVERS)
        except (InputError, UsageError):
            raise
        except Exception as e:  # torchao's matcher or converter fails on an op: the FX flow, with a note
            if cfg.engine == "pt2e":
                raise UsageError(f"the PT2E engine cannot quantize this model: {safe(first_line(e, 160))}") from None
            self.engine, self.fallback = "fx", f"torchao's PT2E failed ({type(e).__name__}: {safe(first_line(e, 120))})"
            self.backend = int8.backend()
            return self._prepare_fx()

    def _compiled_wrong(self, q: int8.Int8Model) -> str | None:
        """Where ``auto`` chose PT2E for PTQ and models are compiled: why the compiled graph is not the one to run
        (its first call, on a batch of calibration samples, compares it with the reference graph; pt2e.Runner),
        else None. PyTorch 2.13's inductor gets ShuffleNetV2's wrong (26-53% off; 61.8% on MNIST's test set
        against 74.9% for the reference graph)."""
        if self.engine != "pt2e" or self.qat or self.config.engine != "auto" or q.runner is None:
            return None
        if not pt2e.compile_enabled():  # the reference graph runs: nothing to compare
            return None
        x = next(iter(batches(self.calib, 64, torch.arange(min(64, len(self.calib))))))[0]
        with torch.no_grad():
            q(x.float())
        return q.runner.failed

    def _prepare_fx(self):
        cfg = self.config
        if cfg.observer == "mse":
            raise UsageError(f'observer "mse" runs on the PT2E engine only, which cannot run here: {self.fallback}')

        if self.qat:
            self.seen, self.observer = 0, "moving average (QAT)"
            return self._make("histogram")
        return self._calibrated(int8.OBSERVERS)

    def _split(self) -> tuple[int, int]:
        """(calibration samples, of which the first ``cut`` calibrate the candidates of ``auto`` and of the
        fallback's ranking; the rest judge them)."""
        n = min(self.config.calib_samples, len(self.calib))
        return n, (n - n // HELD_OUT if n >= HELD_OUT else n)

    def _error(self, q: nn.Module) -> float:
        """The output error of a converted model against FP32, relative L2, on the held-out calibration samples
        (all of them when there are too few to hold some out)."""
        if not self.held:
            n, cut = self._split()
            with torch.no_grad():
                self.held = [
                    (x.float(), self.float_model.eval()(x.float()))
                    for x, _ in batches(self.calib, 64, torch.arange(cut if cut < n else 0, n))
                ]
        with torch.no_grad(), int8._quiet():
            num = sum(float(((q(x) - r).double() ** 2).sum()) for x, r in self.held)
        den = sum(float((r.double() ** 2).sum()) for _, r in self.held)
        return math.sqrt(num / max(den, 1e-30))

    def _build(self, kept: tuple[str, ...], samples: int, observer: str | None = None) -> nn.Module:
        """A converted model with ``kept`` float, calibrated on the first ``samples`` calibration samples."""
        prepared = self._make(observer or self.observer, kept)
        int8.calibrate(prepared, self.calib, samples)
        return _Reference(self._convert(prepared))

    def _calibrated(self, candidates) -> nn.Module:
        """A prepared model calibrated with the observer asked for, or with ``auto`` the candidate whose
        converted outputs are closest to FP32 (relative L2) on the last 1/HELD_OUT of the calibration samples,
        having seen the rest; the one kept then sees all of them."""
        cfg = self.config
        n, cut = self._split()
        if cfg.observer != "auto" or n < HELD_OUT:
            self.observer = "histogram" if cfg.observer == "auto" else cfg.observer
        else:
            for obs in candidates:
                self.observer_errors[obs] = self._error(self._build(self.kept, cut, obs))
            self.observer = min(self.observer_errors, key=self.observer_errors.__getitem__)
        prepared = self._make(self.observer)
        self.seen = int8.calibrate(prepared, self.calib, n)
        return prepared

    @property
    def qat(self) -> bool:
        return self.config.finetune.epochs > 0

    def step(self, lr: float | None = None) -> bool:
        """QAT: after ``freeze_at`` steps, batch-norm statistics and activation ranges stop moving (the
        weights settle on the grid they will run with)."""
        self.steps += 1
        if self.qat and not self.frozen and self.steps >= self.freeze_at:
            if self.engine == "pt2e":
                from torchao.quantization.pt2e.fake_quantize import disable_observer as pt2e_disable

                self.model.apply(pt2e_disable)
                self.model.frozen = True  # type: ignore[assignment]
                self.model.train()
            else:
                from torch.ao.nn.intrinsic.qat import freeze_bn_stats
                from torch.ao.quantization import disable_observer

                self.model.apply(freeze_bn_stats)
                self.model.apply(disable_observer)
            self.frozen = True
        return False

    def fine_tune(self) -> None:
        if self.qat and self.ctx.train is not None:
            with int8._quiet():
                self.train(self.config.finetune.epochs, desc="int8 quantization-aware training")

    def finalize(self) -> nn.Module:
        cfg = self.config
        native = list(self.native if self.engine == "pt2e" else getattr(self.prepared, "native_activations", []))
        if self.engine == "pt2e" and self.qat:
            pt2e.train_mode(self.prepared, False)
        graph = self._convert(self.prepared.cpu())
        graph, budget = self._meet_budget(graph)
        table = {
            "engine": self.engine,
            "backend": self.backend,
            "observer": self.observer,
            "input_shape": list(self.shape),
            "calibration": f"{self.calib.name}, {self.seen} samples",
            "keep_float": list(self.kept),
            "native_activations": native,
            **budget,
        }
        if self.engine == "pt2e":
            table["reduce_range"] = int(not pt2e.vnni())
        if self.observer_errors:
            table["observer_errors"] = [[k, round(v, 6)] for k, v in self.observer_errors.items()]
        if self.fallback:
            table["engine_note"] = self.fallback
            self.notes.append(f"INT8 on torch.ao's FX flow: {self.fallback}")
        if self.qat:
            table["qat"] = f"{cfg.finetune.epochs:g} epochs on {self.ctx.train.name}"
            table["calibration"] = f"moving averages over the QAT batches of {self.ctx.train.name}"
        q = int8.Int8Model(graph, {"version": 1, **table}, self.float_model).eval()
        wrong = self._compiled_wrong(q)
        if wrong:  # inductor cannot compile the graph, or computes other numbers: the FX flow runs the model
            self.engine, self.fallback = "fx", f"inductor cannot run torchao's PT2E graph ({wrong})"
            self.backend, self.observer_errors = int8.backend(), {}
            self.prepared = self._prepare_fx()
            return self.finalize()
        if self.kept:
            self.notes.append(f"kept in float: {', '.join(self.kept)}")
        if native:
            self.notes.append(
                f"{len(native)} hand-written hard-swish / hard-sigmoid modules run as torch's own "
                f"(one INT8 op each, not every step of the formula): {', '.join(native[:3])}"
                + (", ..." if len(native) > 3 else "")
            )
        if self.observer_errors:
            self.notes.append(
                f"observer {self.observer} (output error vs FP32 on {self.calib.name}'s held-out calibration "
                "samples: " + ", ".join(f"{k} {v:.4f}" for k, v in self.observer_errors.items()) + ")"
            )
        self.layers = [
            {"name": n, "int8": n not in self.kept}
            for n, m in self.float_model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        return q

    def _meet_budget(self, graph: nn.Module) -> tuple[nn.Module, dict]:
        """Under a budget (the config's, else for PTQ the pipeline's, ``ctx.judge``): the converted ``graph``
        judged on the validation data and, for PTQ while it misses, the most costly layers kept float
        (``int8_fallback``); returns the graph kept and the table's entries that say so (none without a budget)."""
        cfg, ctx = self.config, self.ctx
        own = cfg.max_accuracy_drop is not None
        if not own and self.qat:  # the pipeline's budget drives PTQ's fallback; its search judges QAT itself
            return graph, {}
        judge = ctx.judge
        if cfg.max_accuracy_drop is not None:  # against the stage's float input, the pipeline's margin inside one
            z = ctx.judge.z if ctx.judge is not None else 1.0
            judge = Judge(ctx.val, cfg.max_accuracy_drop, z, ctx.metric, ctx.evaluate)
            judge.start(self.float_model)
        if judge is None:
            return graph, {}
        first = judge(_Reference(graph))
        fb = int8_fallback.Fallback((), _Reference(graph), first)
        if not self.qat:
            n, cut = self._split()
            layers = [
                name
                for name, m in self.float_model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in self.kept
            ]
            fb = int8_fallback.fall_back(
                fb.model,
                first,
                layers,
                cfg.max_float_layers,
                lambda kept, ranking: self._build(tuple(sorted({*self.kept, *kept})), cut if ranking else n),
                self._error,
                judge,
                self.observer_errors.get(self.observer),
            )
            self.kept = tuple(sorted({*self.kept, *fb.kept}))
        data = judge.data
        where = f"{data.name}, {len(data):,} samples, against {'the float model' if own else 'the pipeline input'}"
        said = f"{fb.verdict['verdict']} ({where})"
        if fb.kept:
            self.notes.append(
                f"the budget kept {len(fb.kept)} layer(s) float, the most costly first (output error vs FP32 all "
                f"INT8 -> with only it float; {_label(ctx)} before -> after): "
                + "; ".join(f"{r[0]} {r[1]:.4f} -> {r[2]:.4f}, {r[3]:.2f} -> {r[4]:.2f}" for r in fb.rows)
                + f" ({fb.ranked} layers ranked, {fb.conversions} conversions)"
            )
        if fb.met:
            self.notes.append(f"accuracy budget: {said}" + (f"; all INT8: {first['why']}" if fb.kept else ""))
        else:
            if self.qat:
                why = "quantization-aware training has no float fallback (it follows PTQ)"
            elif not cfg.max_float_layers:
                why = "max_float_layers is 0: no layer was kept float"
            elif not fb.tried:
                why = f"no layer's float copy lowered the output error ({fb.ranked} ranked)"
            else:
                why = (
                    f"{fb.tried} layer(s) tried float (max_float_layers {cfg.max_float_layers}); kept: the model "
                    f"with the least drop, {len(fb.kept)} of them float"
                )
            self.notes.append(f"accuracy budget missed: {said}; {why}")
        entries: dict = {"budget": said}
        if fb.rows:
            entries["float_fallback"] = fb.rows
        return getattr(fb.model, "graph", fb.model), entries


def _label(ctx: Context) -> str:
    """What the judge's scores are, in a word or two."""
    return "score" if ctx.evaluate is not None else ctx.metric.label


class _Reference(nn.Module):
    """A converted graph as the budget's judge and the output error run it: its reference graph (a candidate
    runs once: nothing is compiled), inputs as floats."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, x):
        with int8._quiet():
            return self.graph(x.float())


def lower_int8(
    model: nn.Module,
    config: Int8Config | None = None,
    train_data=None,
    val_data=None,
    *,
    calib_data=None,
    ctx: Context | None = None,
) -> int8.Int8Model:
    """A new ``Int8Model`` that runs ``model`` as integers (``model`` is left as it was): activation ranges are
    calibrated on ``calib_data`` (default: ``train_data``, which QAT -- ``config.finetune.epochs`` > 0 -- trains
    on). Not ``quantize_``: that verb changes a model in place, and this one makes a new one."""
    cfg = Int8Config() if config is None else config
    return run("quantize", model, cfg, _ctx(ctx, train_data, val_data, None, calib_data)).model  # type: ignore[return-value]


def to_int8(
    model: nn.Module,
    calib: Data,
    input_shape=None,
    observer: str = "auto",
    samples: int = int8.CALIB_SAMPLES,
    keep_float=(),
    *,
    qat: FineTune | None = None,
    ctx: Context | None = None,
    engine: str = "auto",
) -> int8.Int8Model:
    """An INT8 copy of ``model`` (left unchanged) calibrated on up to ``samples`` samples of ``calib``;
    ``keep_float``: globs of layer names left in float (a sensitive first or last layer); ``qat``: train this
    long with fake quantization on ``calib`` (then labelled training data) before converting. ``ctx``: the
    task's loss, train_step, device (its ``train`` is ``calib``); ``engine``: as ``Int8Config.engine``."""
    if calib is None:
        raise UsageError("INT8 activations need calibration data (--calib-data SPEC): none was given")
    data = as_data(calib, "calibration data")
    ctx = dataclasses.replace(ctx, train=data, calib=data) if ctx is not None else Context(train=data, calib=data)
    if input_shape is not None:
        ctx.input_shape = tuple(input_shape)
    cfg = Int8Config(
        observer=observer,
        calib_samples=samples,
        select=Select(exclude=tuple(keep_float), spare_first_last=False),
        finetune=qat or Int8Config().finetune,
        engine=engine,
    )
    return lower_int8(model, cfg, ctx=ctx)
