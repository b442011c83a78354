"""The one contract of every stage: ``run(verb, model, config, ctx) -> StageResult``.

A stage is a *method* object with one lifecycle, in the style of Torch-Pruning's pruners::

    method = ThresholdPruner(model, ThresholdConfig(sparsity=0.9), ctx)
    method.attach()                 # masks, codes, penalty state, or a structural change
    for each training step:         # the library's `fit`, or the user's own loop (compress.ThresholdPruner and kin)
        loss = loss + method.penalty()      # when it has one (group lasso)
        loss.backward(); method.after_backward(); optimizer.step()
        if method.step(lr): rebuild the optimizer (the architecture changed)
    model = method.finalize()       # exact zeros, snapped codes: no training state left

The library's verbs (``prune_``, ``quantize_``, ``factorize_``) build the method from the config's
registry entry, call ``attach``, ``fine_tune`` (the shared loop driving the same hooks) and
``finalize``, and return the model; ``run`` returns the ``StageResult`` with the numbers every
caller shows. Each config belongs to one verb: ``prune_(m, QuantConfig())`` is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress import kinds, masks
from compress.budget import MAX_INPUT_VALUES
from compress.config import Config, FilterFn, FineTune, Selection, check_filter_fn, method_for
from compress.counting import check_call
from compress.data import as_data
from compress.errors import InputError, UsageError, param
from compress.meta import add_history, read_meta
from compress.scoring import Judge, evaluate, resolve_metric
from compress.train import fit, resolve_loss

log = logging.getLogger(__name__)


# Context's data fields and the names the numbers measured on them carry
DATA_FIELDS = {"train": "training data", "val": "validation data", "calib": "calibration data"}


@dataclasses.dataclass
class Context:
    """What a stage may use beside its config.

    Args:
        train: training data for fine-tuning and calibration: anything ``compress.data.as_data`` takes
            (``(x, y)`` tensors, a ``Dataset``, a ``DataLoader``, a ``compress.data.Data``).
        val: held-out data; methods with rounds report its score after each.
        input_shape: (1, C, H, W) for tracing; default: from the data, else the model's metadata.
        device: move the model here before the stage ("cpu", "cuda:0"); None: leave it where it is.
        on_event: ``(kind, fields)`` callback for progress ("round", "reconfigure").
        loss: the task's loss ``loss(outputs, targets)`` (default cross-entropy), or ``module:fn``.
        metric: how a model is scored: "top1" (default), "top5", ``metric(outputs, targets)`` or
            ``module:fn`` (higher is better; see ``compress.scoring.Metric``).
        train_step: ``train_step(model, inputs, targets) -> loss`` instead of ``loss`` (mixup, several
            outputs, anything else); compress does the backward pass, the hooks and the optimizer step.
        evaluate: ``evaluate(model, data) -> float`` instead of ``metric`` (higher is better); the budget
            of ``pipeline`` then has no standard error to add, and says so.
        teacher: the model distillation learns from (default: the stage's input model).
        calib: calibration data for activation ranges (INT8); default: ``train``.
        filter_fn: ``(module, fqn) -> bool``: the stage touches only the layers of its config's ``select`` this
            accepts (code, so not a config field: a config stays data that a file or a recipe holds).
        judge: the accuracy budget of the run the stage is part of (a started ``compress.scoring.Judge``;
            ``pipeline`` sets its own): a stage that meets a budget itself -- the int8 stage's float fallback --
            meets this one when its config sets none.

    ``train``, ``val`` and ``calib`` are converted by ``as_data`` whenever they are set (here or later), so
    each is a ``compress.data.Data`` from then on; anything else is an ``InputError`` naming the field.
    """

    train: Any = None
    val: Any = None
    input_shape: tuple | None = None
    device: str | None = None
    on_event: Callable[[str, dict], None] | None = None
    loss: Any = None
    metric: Any = None
    train_step: Callable | None = None
    evaluate: Callable | None = None
    teacher: nn.Module | None = None
    calib: Any = None
    filter_fn: FilterFn | None = None
    judge: Judge | None = None

    def __post_init__(self):
        self.loss, self.metric = resolve_loss(self.loss), resolve_metric(self.metric)
        check_filter_fn(self.filter_fn)

    def __setattr__(self, key: str, value) -> None:
        if key in DATA_FIELDS and value is not None:  # the one conversion, whichever way the data come in
            value = as_data(value, DATA_FIELDS[key], arg=key)
        super().__setattr__(key, value)

    def emit(self, kind: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)

    def score(self, model: nn.Module, data) -> float:
        """The model's score on ``data`` (anything ``as_data`` takes; the user's ``evaluate`` gets it as a
        ``compress.data.Data``, as from every stage): the user's ``evaluate`` if given, else ``metric``'s mean."""
        data = as_data(data, arg="data")
        if self.evaluate is not None:
            return float(self.evaluate(model, data))
        return evaluate(model, data, self.metric)

    def shape(self, model: nn.Module) -> tuple[int, ...]:
        """(1, C, H, W): given, else from the data, else from the model's metadata (checked: a file's
        metadata is not trusted to ask for a 6000 x 6000 input)."""
        if self.input_shape:
            return check_shape(self.input_shape, "input shape")
        for d in (self.train, self.val, self.calib):
            if d is not None:
                return check_shape((1,) + tuple(d.sample_shape), f"the shape of {d.name}'s samples")
        meta = read_meta(model)
        if meta.input_shape:
            shape = check_shape(meta.input_shape, "the model file's input shape")
            check_call(model, shape)  # what one sample at the file's shape costs, counted before it runs
            return shape
        raise UsageError(f"cannot tell the model's input shape: give {param('input_shape', (1, 1, 28, 28))} or data")


def check_ctx(ctx: Context | None) -> Context | None:
    """``ctx`` if it is a ``Context`` or None; anything else (data given in its place) is an InputError."""
    if ctx is not None and not isinstance(ctx, Context):
        raise InputError(
            f"ctx: a {type(ctx).__name__} is not a compress.Context; give data as "
            "Context(train=..., val=...), or as the verbs' train_data= and val_data="
        )
    return ctx


def needs_data(what: str) -> UsageError:
    """The one message for a step that cannot run without training data."""
    return UsageError(f"{what}: give training data (Context(train=...); --train-data SPEC)")


def check_shape(shape, what: str = "input shape") -> tuple[int, ...]:
    """(1, ...) from a shape of 2 to 5 positive integers whose sample holds at most MAX_INPUT_VALUES."""
    if not (
        isinstance(shape, (list, tuple))
        and 2 <= len(shape) <= 5
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise InputError(f"{what} {shape!r} must be 2 to 5 positive integers, like 1,1,28,28")
    per_sample = 1
    for s in shape[1:]:
        per_sample *= s
    if per_sample > MAX_INPUT_VALUES:
        raise InputError(
            f"{what} {list(shape)} asks for {per_sample:,} values per sample; at most {MAX_INPUT_VALUES:,} are allowed"
        )
    return (1,) + tuple(shape)[1:]


@dataclasses.dataclass
class StageResult:
    """What a stage did, in numbers. ``layers``: one row per layer it changed or left (with why);
    ``records``: its progress over time (rounds, reconfigurations); ``notes``: what a user should know."""

    stage: str
    config: dict
    model: nn.Module
    layers: list[dict] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": self.config,
            "layers": self.layers,
            "records": self.records,
            "notes": self.notes,
            "seconds": self.seconds,
        }


class Method:
    """Base of every method object; see the module docstring for the lifecycle.

    ``@register_method(YourConfig)`` ties a subclass to its config; it overrides the hooks it needs.
    ``needs_train``: the method cannot run without training data (channel-union trains from the start).
    """

    needs_train: ClassVar[bool] = False
    # False for a method whose result is a new model (INT8 lowering): the in-place verbs refuse its config
    in_place: ClassVar[bool] = True

    def __init__(self, model: nn.Module, config: Config, ctx: Context | None = None):
        refused = kinds.refusal(model, kinds.CHANGE)  # a stored graph or INT8 kernels: no layers to change
        if refused is not None:
            raise refused
        self.model, self.config, self.ctx = model, config, check_ctx(ctx) or Context()
        self.select = Selection(config.select, self.ctx.filter_fn)  # the layers it may touch
        self.teacher = None
        ft = config.finetune
        if ft.distill and ft.distill_weight > 0 and ft.epochs > 0:  # the input model, before any change
            import copy

            self.teacher = self.ctx.teacher if self.ctx.teacher is not None else copy.deepcopy(model)
        self.layers: list[dict] = []
        self.records: list[dict] = []
        self.notes: list[str] = []

    # -- the lifecycle a training loop drives ------------------------------------------------
    def attach(self) -> None:
        """Start: apply masks/codes or change the structure. Called once, before training."""

    def penalty(self) -> torch.Tensor | None:
        """A term to add to the loss, or None."""
        return None

    def after_backward(self) -> None:
        """Rewrite gradients (call after ``loss.backward()``, before ``optimizer.step()``)."""

    def step(self, lr: float | None = None) -> bool:
        """Call after ``optimizer.step()``. True when the architecture changed (rebuild the optimizer)."""
        return False

    def parameters(self):
        """What the optimizer trains; None: the model's own parameters."""
        return None

    def finalize(self) -> nn.Module:
        """End: leave a plain model (exact zeros, weights on their codes), no training state."""
        return self.model

    # -- what the library adds around it -------------------------------------------------------
    def train_config(self, epochs: float, seed: int = 0) -> FineTune:
        """The config's ``finetune`` for ``epochs`` of training, its augmentation resolved from the model."""
        ft: FineTune = self.config.finetune
        augment = ft.augment if ft.augment is not None else (read_meta(self.model).augment or 0)
        return dataclasses.replace(ft, epochs=epochs, augment=augment, seed=ft.seed + seed)

    def train(self, epochs: float, seed: int = 0, desc: str | None = None) -> list[dict]:
        """``epochs`` of the library's loop on ``ctx.train`` with the context's loss (or train_step) and,
        when the config asks for it, distillation from the teacher, driving this method's hooks."""
        return fit(
            self.model,
            self.ctx.train,
            self.train_config(epochs, seed),
            method=self,
            desc=desc or f"{self.config.stage_name} fine-tune",
            loss=self.ctx.loss,
            train_step=self.ctx.train_step,
            teacher=self.teacher,
        )

    def fine_tune(self) -> None:
        """The library's loop: ``config.finetune.epochs`` of training on ``ctx.train``, driving the hooks."""
        epochs = self.config.finetune.epochs
        if epochs > 0 and self.ctx.train is not None:
            self.train(epochs)
        elif epochs > 0:
            self.notes.append("no training data: not fine-tuned")

    def run(self) -> StageResult:
        """attach -> fine_tune -> finalize, timed; the stage and its config go into the model's history
        (files stay small: per-layer rows and records are in the result, not the file)."""
        t0 = time.perf_counter()
        if self.ctx.device:
            self.model.to(self.ctx.device)
        if self.needs_train and self.ctx.train is None:
            raise needs_data(f"{self.config.stage_name} trains")
        self.attach()
        self.fine_tune()
        self.model = self.finalize()
        res = StageResult(
            self.config.stage_name,
            self.config.to_dict(),
            self.model,
            self.layers,
            self.records,
            self.notes,
            round(time.perf_counter() - t0, 2),
        )
        add_history(self.model, {"stage": res.stage, "config": self.config.changes()})  # what was done, in a few bytes
        return res


class KeepMasks(Method):
    """A method whose pruning masks hold through training: masked weights get no gradient (so no
    optimizer state either) and are zeroed again after every step."""

    def after_backward(self) -> None:
        masks.mask_grads(self.model)

    def step(self, lr: float | None = None) -> bool:
        masks.enforce(self.model)
        return False

    def finalize(self) -> nn.Module:
        masks.remove_masks(self.model)  # exact zeros, no mask machinery
        return self.model


def run(
    verb: str, model: nn.Module, config: Config, ctx: Context | None = None, *, filter_fn: FilterFn | None = None
) -> StageResult:
    """Apply ``config`` to ``model`` under ``verb``; the model changes in place. ``filter_fn(module, fqn) -> bool``:
    only the layers of ``config.select`` it accepts are touched (``ctx.filter_fn``; give it once)."""
    return method_for(config, verb)(model, config, _ctx(ctx, filter_fn=filter_fn)).run()


def _ctx(ctx, train_data=None, val_data=None, input_shape=None, calib_data=None, filter_fn=None) -> Context | None:
    """The verbs' context: ``ctx``, with ``train_data``, ``val_data``, ``calib_data`` and ``filter_fn`` in it when
    given (data converted by ``as_data``, an error naming the argument for anything that is not data)."""
    pairs = (("train", train_data), ("val", val_data), ("calib", calib_data))
    given: dict[str, Any] = {k: as_data(v, DATA_FIELDS[k], arg=f"{k}_data") for k, v in pairs if v is not None}
    if filter_fn is not None:
        given["filter_fn"] = check_filter_fn(filter_fn)
    if ctx is None:
        return Context(input_shape=input_shape, **given) if given or input_shape is not None else None
    check_ctx(ctx)
    for k in given:
        if getattr(ctx, k) is not None:
            what = "filter_fn" if k == "filter_fn" else f"the {DATA_FIELDS[k]}"
            arg = "filter_fn" if k == "filter_fn" else f"{k}_data"
            raise UsageError(f"{arg} and ctx.{k} are both given: give {what} once")
    return dataclasses.replace(ctx, **given) if given else ctx


def prune_(
    model: nn.Module,
    config: Config,
    train_data=None,
    val_data=None,
    *,
    input_shape=None,
    ctx: Context | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Prune in place with a pruning config; returns the model for chaining. ``filter_fn(module, fqn) -> bool``:
    only the layers of ``config.select`` it accepts are pruned."""
    return run("prune", model, config, _ctx(ctx, train_data, val_data, input_shape, filter_fn=filter_fn)).model


def quantize_(
    model: nn.Module,
    config: Config,
    train_data=None,
    val_data=None,
    *,
    calib_data=None,
    ctx: Context | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Quantize weights in place with a ``QuantConfig``; returns the model for chaining. Lowering to INT8
    execution makes a new model: that is ``compress.lower_int8(model, Int8Config(...), calib_data=...)``.
    ``filter_fn(module, fqn) -> bool``: only the layers of ``config.select`` it accepts are quantized."""
    method: type[Method] = method_for(config, "quantize")
    if not method.in_place:
        raise UsageError(
            f"quantize_ changes a model in place; a {type(config).__name__} makes a new model: "
            f"use compress.lower_int8(model, {type(config).__name__}(...), calib_data=...)"
        )
    return run("quantize", model, config, _ctx(ctx, train_data, val_data, None, calib_data, filter_fn)).model


def factorize_(
    model: nn.Module,
    config: Config,
    train_data=None,
    val_data=None,
    *,
    ctx: Context | None = None,
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Factorize layers in place with a ``FactorizeConfig``; returns the model for chaining.
    ``filter_fn(module, fqn) -> bool``: only the layers of ``config.select`` it accepts are factorized."""
    return run("factorize", model, config, _ctx(ctx, train_data, val_data, None, filter_fn=filter_fn)).model
