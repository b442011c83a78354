"""Static INT8 that PyTorch executes as integers: weights per channel, activations per tensor, both calibrated.

The pieces of the lowering (the ``int8`` method, ``int8_stage.py``, drives them): ``prepare`` traces a copy
of the model through PyTorch's own FX graph-mode quantization for the x86 backend (fbgemm / oneDNN kernels;
conv-bn-relu fused; observers, or fake quantization for QAT), ``calibrate`` runs calibration batches through
its observers, ``convert`` makes the ``Int8Model`` whose convs and linears run INT8 on the CPU. compress writes
no kernels.

An INT8 model is an FX ``GraphModule`` -- generated code -- so it is never pickled. Its file holds data only:
the float architecture with its weights zeroed as a .cpz (``compress_cpz``, a few KB), the INT8 state packed by
dtype (each quantized tensor as its integers, scales and zero points) with an index, and a small table naming
the backend, the observer, the input shape and the model's metadata (``int8_file.py``; docs/format.md). Loading
rebuilds the same INT8 model from the architecture (trace, prepare,
convert: compress's own code on classes the .cpz may name) and loads the checked state into it: no trust
needed (``compress.model_io.load_model``). ``torch.backends.quantized.engine`` is set to the file's backend.

Torch 2.13 marks its quantized tensors deprecated (pytorch/pytorch#184982) in favour of torchao's PT2E flow
with ``torch.compile``; the kernels still run, and their warnings are kept inside this module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import warnings

import torch
import torch.nn as nn

from compress import kinds
from compress.budget import call_limits
from compress.counting import count_macs, count_params, counts, known_cost
from compress.cpz.container import encode_model
from compress.data import Data, batches
from compress.errors import INT8_IS_PT, InputError, UsageError
from compress.meta import META_ATTR, get_meta
from compress.quantize.pt2e import observe_percentiles

# activation ranges: the histogram's least-error range, min-max, or a percentile of each batch's values (averaged)
OBSERVERS = ("histogram", "minmax", "percentile")
PERCENTILE = 99.99
CALIB_SAMPLES = 512
BACKENDS = ("x86", "qnnpack")  # x86 CPUs (fbgemm / oneDNN); ARM (phones, Apple silicon, Raspberry Pi): QNNPACK


def _require_fx() -> None:
    """torch.ao's FX flow is deprecated in torch 2.13 (pytorch/pytorch#184982): a later torch may not have it."""
    try:
        importlib.import_module("torch.ao.quantization.quantize_fx")  # (an `import torch.ao...` here would bind torch)
    except ImportError as e:
        raise UsageError(
            f"this PyTorch ({torch.__version__}) has no FX INT8 flow (torch.ao.quantization); use "
            "export --int8 (ONNX Runtime or OpenVINO)"
        ) from e


def backend() -> str:
    """The INT8 kernels this machine has: x86's where PyTorch ships them, else QNNPACK's."""
    _require_fx()
    engines = torch.backends.quantized.supported_engines
    for b in BACKENDS:
        if b in engines:
            return b
    raise UsageError(
        f"this PyTorch build has no INT8 CPU kernels ({', '.join(engines) or 'none'}); use export --int8 (ONNX Runtime)"
    )


@contextlib.contextmanager
def _quiet():
    """torch.ao's flow, its observers and its quantized tensors announce their deprecation on every call
    (DeprecationWarning and UserWarning alike); nothing else runs in here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.cache
def _percentile_observer_class():
    """torch.ao's MinMaxObserver with the range from percentiles (TensorRT's "percentile" calibration): per
    batch, the ``100 - p`` and ``p`` percentiles of the values (of at most 2^20 evenly strided ones), averaged
    over batches; outliers beyond them saturate instead of stretching the grid for everything else. Made on
    first use: torch.ao loads lazily."""
    from torch.ao.quantization.observer import MinMaxObserver

    class _Percentile(MinMaxObserver):
        def __init__(self, percentile: float = PERCENTILE, **kw):
            super().__init__(**kw)
            self.percentile = percentile
            self.register_buffer("batches", torch.tensor(0))

        def forward(self, x_orig):
            return observe_percentiles(self, x_orig, resize=True)

    return _Percentile


def _qconfig_mapping(
    observer: str,
    keep_float: tuple[str, ...] = (),
    engine: str = "x86",
    qat: bool = False,
    percentile: float = PERCENTILE,
):
    """torch.ao's default mapping for ``engine`` (per-channel symmetric int8 weights, uint8 activations; with
    ``qat`` fake-quantized for training), its activation observer replaced as ``observer`` says."""
    from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.observer import MinMaxObserver

    if observer not in OBSERVERS:
        raise UsageError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    if qat:  # moving-average ranges learned while training: the observer is the QAT flow's own
        mapping = get_default_qat_qconfig_mapping(engine)
    else:
        mapping = get_default_qconfig_mapping(engine)
        weight = mapping.global_qconfig.weight if mapping.global_qconfig is not None else None
        # reduce_range as x86's default does (no overflow without VNNI); QNNPACK uses the full range
        if observer == "minmax":
            act = MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=engine == "x86")
            mapping = mapping.set_global(QConfig(activation=act, weight=weight))
        elif observer == "percentile":
            act = _percentile_observer_class().with_args(
                percentile=percentile, dtype=torch.quint8, reduce_range=engine == "x86"
            )
            mapping = mapping.set_global(QConfig(activation=act, weight=weight))
    for name in keep_float:  # these layers stay float: the graph dequantizes before them, quantizes after
        mapping = mapping.set_module_name(name, None)
    return mapping


def native_activations(model: nn.Module) -> list[str]:
    """Parameter-free leaf modules that compute hard-swish or hard-sigmoid by hand (``x * relu6(x + 3) / 6``, as
    pytorchcv's HSwish does) are replaced in ``model`` by torch's own ``nn.Hardswish`` / ``nn.Hardsigmoid``
    (judged by what they compute on a probe, not by name); returns their names. Traced as written, every
    intermediate of the formula would be quantized, each with its own rounding error (what that costs:
    docs/methods.md, "Why the INT8 lowering does what it does")."""
    import torch.nn.functional as F

    probe = torch.linspace(-8.0, 8.0, 289).reshape(1, 1, 17, 17)
    targets = ((nn.Hardswish, F.hardswish), (nn.Hardsigmoid, F.hardsigmoid))
    swapped = []
    for name, mod in list(model.named_modules()):
        if (
            not name
            or isinstance(mod, (nn.Hardswish, nn.Hardsigmoid))
            or any(True for _ in mod.children())
            or any(True for _ in mod.parameters())
            or any(True for _ in mod.buffers())
        ):
            continue
        try:
            with torch.no_grad():
                out = mod(probe.clone())
        except Exception:
            continue
        for cls, fn in targets:
            if isinstance(out, torch.Tensor) and out.shape == probe.shape and torch.allclose(out, fn(probe), atol=1e-5):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, cls())
                swapped.append(name)
                break
    return swapped


def prepare(
    model: nn.Module,
    input_shape,
    observer: str = "histogram",
    keep_float: tuple[str, ...] = (),
    engine: str = "x86",
    qat: bool = False,
    percentile: float = PERCENTILE,
    native: bool = True,
) -> torch.fx.GraphModule:
    """A copy of ``model`` prepared for ``engine``'s INT8 kernels: traced, conv-bn-relu fused, observers in place
    (``qat``: fake-quantized in training mode, for quantization-aware training). ``keep_float``: layer names
    left in float. ``native``: hand-written hard-swish / hard-sigmoid become torch's (``native_activations``;
    files written before compress did this rebuild without it)."""
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise InputError(
            f"this model was made for {engine} INT8 kernels, which this PyTorch build lacks "
            f"({', '.join(torch.backends.quantized.supported_engines)}); quantize it again here"
        )
    torch.backends.quantized.engine = engine
    example = torch.zeros(tuple(input_shape))
    mapping = _qconfig_mapping(observer, keep_float, engine, qat, percentile)
    work = copy.deepcopy(model).cpu()
    swapped = native_activations(work) if native else []
    try:
        with _quiet():
            if qat:
                prepared = prepare_qat_fx(work.train(), mapping, (example,))
            else:
                prepared = prepare_fx(work.eval(), mapping, (example,))
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as e:
        raise InputError(
            f"the model cannot be traced for INT8 execution ({str(e).splitlines()[0][:160]}); "
            "keep it float, or use export --int8 (ONNX Runtime)"
        ) from e
    setattr(prepared, "native_activations", swapped)  # noqa: B010  (a Module attribute mypy cannot type: the stage's notes)
    return prepared


def calibrate(prepared: nn.Module, calib: Data, samples: int = CALIB_SAMPLES) -> int:
    """Run up to ``samples`` samples of ``calib`` through ``prepared``'s observers; returns how many ran.
    NaN or infinite inputs are refused (they would set every range they reach)."""
    if calib is None or len(calib) == 0:
        raise UsageError("INT8 activations need calibration data (--calib-data SPEC): none was given")
    seen = 0
    with _quiet(), torch.no_grad():
        for x, _ in batches(calib, 64, torch.arange(min(samples, len(calib)))):
            if not bool(torch.isfinite(x).all()):
                raise InputError(f"calibration data {calib.name}: NaN or infinite values")
            prepared(x.float())
            seen += len(x)
    return seen


def check_calibration(calib: Data, samples: int = CALIB_SAMPLES) -> None:
    """Calibration data that can set ranges: some samples, every value finite (checked before any work)."""
    if calib is None or len(calib) == 0:
        raise UsageError("INT8 activations need calibration data (--calib-data SPEC): none was given")
    with torch.no_grad():
        for x, _ in batches(calib, 64, torch.arange(min(samples, len(calib)))):
            if not x.is_floating_point() and x.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32):
                raise InputError(f"calibration data {calib.name}: inputs of type {x.dtype}, not numbers")
            if not bool(torch.isfinite(x.float()).all()):
                raise InputError(f"calibration data {calib.name}: NaN or infinite values")


def convert_graph(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The converted FX graph of a calibrated prepared model (no Int8Model around it)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        return convert_fx(prepared.cpu().eval())


def convert(prepared: torch.fx.GraphModule, table: dict, float_model: nn.Module) -> Int8Model:
    """The INT8 model of a calibrated (or QAT-trained) prepared model; ``table`` says how it was made."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with _quiet():
        q = convert_fx(prepared.cpu().eval())
    return Int8Model(q, {"version": 1, **table}, float_model).eval()


class Int8Model(nn.Module):
    """An INT8 model: ``inner`` (the converted FX graph) runs; ``compress_int8`` says how it was made;
    ``arch_cpz`` is its float architecture (weights zeroed) as .cpz bytes, what its file stores and rebuilds
    it from -- a few kilobytes, so no float copy of the weights stays in memory."""

    def __init__(self, inner: nn.Module, table: dict, float_model: nn.Module, arch_cpz: bytes | None = None):
        super().__init__()
        self.inner = inner
        self.compress_int8 = dict(table)
        self.arch_cpz = arch_cpz if arch_cpz is not None else _arch_bytes(float_model)
        # the float model's metadata as it is (a file's may hold keys of a newer compress), and its input shape
        setattr(self, META_ATTR, {**copy.deepcopy(get_meta(float_model)), "input_shape": list(table["input_shape"])})
        # its parameters and MACs are the float architecture's (as integers), counted while it is at hand: decoding
        # the architecture again may need the user's --arch
        self.params = count_params(float_model)
        self.macs = count_macs(float_model, table["input_shape"])
        self.runner = None
        if self.engine == "pt2e":
            from compress.quantize.pt2e import Runner

            self.runner = Runner(inner)  # type: ignore[arg-type]

    @property
    def engine(self) -> str:
        """``pt2e`` (torchao's flow, compiled by inductor) or ``fx`` (torch.ao's FX flow, quantized tensors)."""
        return str(self.compress_int8.get("engine", "fx"))

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with _quiet():  # (an exported graph's tree specs warn as they are copied)
            for k, v in self.__dict__.items():
                if k != "runner":
                    new.__dict__[k] = copy.deepcopy(v, memo)
        new.runner = None
        if self.runner is not None:
            from compress.quantize.pt2e import Runner

            new.runner = Runner(new.inner)
        return new

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds the first call at each input shape spent compiling (PT2E), by shape (``32x3x32x32``)."""
        return dict(self.runner.compile_seconds) if self.runner is not None else {}

    def nonzeros(self) -> int:
        """Nonzero weights and biases of its INT8 layers (a pruned weight's integer is 0: its zero point)."""
        n = 0
        if self.runner is not None:
            from compress.quantize.pt2e import constants, is_qdq

            graph = self.inner
            qparams: set[str] = set()  # per-channel scales and zero points are not weights
            for node in graph.graph.nodes:  # type: ignore[union-attr]
                if node.op == "call_function" and "per_channel" in str(node.target) and not is_qdq(node):
                    qparams.update(a.target for a in node.args[1:3] if hasattr(a, "target"))
            for name, t in constants(graph).items():  # type: ignore[arg-type]
                if name not in qparams and t.dim() >= 1:
                    n += int(torch.count_nonzero(t))
            return n
        with _quiet():
            for v in self.inner.state_dict().values():
                for t in v if isinstance(v, tuple) else (v,):
                    if isinstance(t, torch.Tensor) and t.is_quantized and t.qscheme() == torch.per_channel_affine:
                        n += int(torch.count_nonzero(t.int_repr()))
                    elif isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1:
                        n += int(torch.count_nonzero(t))
        return n

    sample_bytes = 0  # activation bytes of one sample (set when rebuilt from a file): each batch is checked

    def forward(self, x):
        if self.sample_bytes and isinstance(x, torch.Tensor) and x.dim() > 0:
            _, max_bytes = call_limits()
            if x.shape[0] * self.sample_bytes > max_bytes:
                raise InputError(
                    f"this INT8 model's file asks for {self.sample_bytes / 2**20:,.1f} MiB of activations "
                    f"a sample: a batch of {x.shape[0]} would take more than {max_bytes / 2**20:,.0f} MiB "
                    "(COMPRESS_MAX_GRAPH_COST raises it for a file you trust)"
                )
        if self.runner is not None:
            return self.runner(x.float())
        with _quiet():
            return self.inner(x.float())


# its layers are packed INT8 kernels: no method changes them, ONNX is exported from its float model and a .cpz
# cannot hold them
_REFUSED = {
    kinds.CHANGE: "this is an INT8 model: its layers are integer kernels no method changes; prune, factorize or "
    "quantize the float model before its int8 stage",
    kinds.ONNX: "this INT8 model runs PyTorch's own integer kernels; export its float model with --int8 for ONNX "
    "Runtime or OpenVINO INT8",
    kinds.CPZ: INT8_IS_PT,
}


@kinds.refusal.register(Int8Model)
def _refusal(model: Int8Model, action: str) -> UsageError | None:
    return UsageError(_REFUSED[action]) if action in _REFUSED else None


@kinds.execution.register(Int8Model)
def _execution(model: Int8Model) -> dict:
    t = model.compress_int8
    if model.engine == "pt2e":
        how = "torchao PT2E, compiled by inductor (oneDNN INT8 kernels)"
        if model.runner is not None and model.runner.failed:
            how = f"torchao PT2E, reference graph (inductor failed: {model.runner.failed})"
        return {
            **t,
            "executes": f"INT8 weights and activations ({how}); MACs are INT8 MACs",
            "compile_seconds": model.compile_seconds,
        }
    return {
        **t,
        "executes": f"INT8 weights and activations (PyTorch {t['backend']} kernels, torch.ao FX); MACs are INT8 MACs",
    }


@kinds.keeps_input_shape.register(Int8Model)
def _keeps_input_shape(model: Int8Model) -> bool:
    return True  # its conversion's


@counts.register(Int8Model)
def _counts(model: Int8Model, input_shape=None) -> dict:
    out = {"params": model.params, "nonzeros": model.nonzeros()}  # the float architecture's, as integers
    if input_shape is not None:
        out["macs"] = model.macs
    return out


@known_cost.register(Int8Model)
def _known_cost(model: Int8Model, input_shape) -> None:
    return None  # each batch is checked against its activation bytes (``forward``)


def _arch_bytes(float_model: nn.Module) -> bytes:
    """The float model with every float tensor zeroed, as .cpz bytes: its architecture, which is all the INT8
    model is rebuilt from (its INT8 state carries every number it runs with)."""
    skeleton = copy.deepcopy(float_model)
    with torch.no_grad():
        for t in skeleton.state_dict().values():
            if t.is_floating_point():
                t.zero_()
    blob, _ = encode_model(skeleton)
    return blob
