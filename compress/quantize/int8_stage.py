"""The ``int8`` method: static INT8 of weights and activations that PyTorch executes, post-training (PTQ) or
quantization-aware (QAT), under the one method lifecycle (``compress.method``).

``lower_int8(model, Int8Config(), calib_data=calib)`` calibrates activation ranges on the data and returns
an ``Int8Model``; ``Int8Config(finetune=FineTune(epochs=1))`` trains first with fake quantization
(straight-through gradients, conv-bn folded, moving-average ranges) and then converts: the accuracy PTQ
loses to rounding is trained back. The float model given is left as it was; the INT8 model is returned
(it is a new model, not the input changed in place). In a recipe, ``method = "int8"`` with
``finetune = { epochs = [0, 1] }`` tries PTQ and trains only when PTQ misses the budget.
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn as nn

from compress.config import Config, FineTune, Select, bounded, register_method
from compress.data import Data, as_data, check_fits
from compress.errors import UsageError, safe
from compress.method import Context, Method, _ctx, needs_data, run
from compress.quantize import int8, int8_file  # noqa: F401  (int8_file: an Int8Model's writer and size register)


@dataclasses.dataclass(frozen=True)
class Int8Config(Config):
    """Args:
    observer: how activation ranges are set from the calibration data: "histogram" (the range with the
        least quantization error), "minmax", or "percentile" (``percentile`` of each batch's values).
    percentile: the percentile of the "percentile" observer (99.9 .. 100).
    calib_samples: calibration samples read from the stage's data.
    select: the layers that run INT8; every other Conv2d / Linear stays float (``Select.exclude``
        keeps a sensitive stem or classifier float).
    finetune: ``epochs`` > 0: quantization-aware training for that many epochs before the conversion;
        batch-norm statistics and activation ranges are frozen for the last ``freeze`` of it.
    freeze: the share of the QAT steps, at the end, with batch-norm statistics and ranges frozen.
    """

    verb = "quantize"
    stage_name = "int8"
    search_key = "finetune.epochs"
    first_fit = True  # candidates cost more, not compress more: the first within budget is kept

    observer: str = dataclasses.field(default="histogram", metadata={"choices": int8.OBSERVERS})
    percentile: float = bounded(float, 99, 100, int8.PERCENTILE)
    calib_samples: int = bounded(int, 1, 1 << 20, int8.CALIB_SAMPLES)
    freeze: float = bounded(float, 0, 1, 0.3, hi_open=True)
    select: Select = dataclasses.field(default_factory=lambda: Select(spare_first_last=False))
    finetune: FineTune = dataclasses.field(default_factory=lambda: FineTune(epochs=0.0, lr=1e-4, augment=0))

    def __post_init__(self):
        if self.observer not in int8.OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(int8.OBSERVERS)}, got {safe(self.observer)}")


@register_method(Int8Config)
class Int8Lowering(Method):
    """``attach`` traces and prepares a copy of the model (observers; QAT: fake quantization) and, for PTQ,
    calibrates it; the library's loop (or the user's) trains the QAT copy; ``finalize`` converts it to the
    ``Int8Model`` PyTorch runs as integers."""

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
        if cfg.select.exclude:  # the layers kept float are named on purpose: a pattern that names none is an error
            Select(names=cfg.select.exclude, spare_first_last=False).layers(self.model)
        chosen = {n for n, _ in self.select.layers(self.model)}
        self.kept = tuple(
            sorted(
                n for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in chosen
            )
        )
        self.shape = ctx.shape(self.model)
        self.engine = int8.backend()
        self.float_model = self.model
        self.prepared = int8.prepare(
            self.float_model, self.shape, cfg.observer, self.kept, self.engine, self.qat, cfg.percentile
        )
        self.model = self.prepared  # what the loop trains (QAT)
        # PTQ: the ranges from calibration. QAT: the moving averages learn them from the training batches, as
        # the weights adapt (ranges calibrated first, in eval mode, fit statistics the training batches do not
        # have, and QAT does not win that back: docs/methods.md)
        self.seen = 0 if self.qat else int8.calibrate(self.model.eval(), self.calib, cfg.calib_samples)
        self.steps, self.frozen = 0, False
        if self.qat:
            if ctx.device:  # trained where the user trains; converted on the CPU
                self.model.to(ctx.device)
            per_epoch = math.ceil(len(ctx.train) / cfg.finetune.batch_size)
            self.freeze_at = int(per_epoch * cfg.finetune.epochs * (1 - cfg.freeze))

    @property
    def qat(self) -> bool:
        return self.config.finetune.epochs > 0

    def step(self, lr: float | None = None) -> bool:
        """QAT: after ``freeze_at`` steps, batch-norm statistics and activation ranges stop moving (the
        weights settle on the grid they will run with)."""
        self.steps += 1
        if self.qat and not self.frozen and self.steps >= self.freeze_at:
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
        table = {
            "backend": self.engine,
            "observer": cfg.observer,
            "input_shape": list(self.shape),
            "calibration": f"{self.calib.name}, {self.seen} samples",
            "keep_float": list(self.kept),
            "native_activations": list(getattr(self.prepared, "native_activations", [])),
        }
        if self.qat:
            table["qat"] = f"{cfg.finetune.epochs:g} epochs on {self.ctx.train.name}"
            table["calibration"] = f"moving averages over the QAT batches of {self.ctx.train.name}"
        q = int8.convert(self.prepared, table, self.float_model)
        if self.kept:
            self.notes.append(f"kept in float: {', '.join(self.kept)}")
        swapped = getattr(self.prepared, "native_activations", [])
        if swapped:
            self.notes.append(
                f"{len(swapped)} hand-written hard-swish / hard-sigmoid modules run as torch's own "
                f"(one INT8 op each, not every step of the formula): {', '.join(swapped[:3])}"
                + (", ..." if len(swapped) > 3 else "")
            )
        self.layers = [
            {"name": n, "int8": n not in self.kept}
            for n, m in self.float_model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        return q


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
    observer: str = "histogram",
    samples: int = int8.CALIB_SAMPLES,
    keep_float=(),
    *,
    qat: FineTune | None = None,
    ctx: Context | None = None,
) -> int8.Int8Model:
    """An INT8 copy of ``model`` (left unchanged) calibrated on up to ``samples`` samples of ``calib``;
    ``keep_float``: globs of layer names left in float (a sensitive first or last layer); ``qat``: train this
    long with fake quantization on ``calib`` (then labelled training data) before converting. ``ctx``: the
    task's loss, train_step, device (its ``train`` is ``calib``)."""
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
    )
    return lower_int8(model, cfg, ctx=ctx)
