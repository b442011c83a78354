"""ONNX export, checked against PyTorch, and INT8 execution through ONNX Runtime static
quantization (QDQ format, per-channel weights, calibrated on data)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from compress import kinds
from compress import openvino_export as ov
from compress.data import as_data, batches
from compress.errors import InputError, UsageError, first_line, param
from compress.filesystem import write_bytes
from compress.masks import remove_masks
from compress.measure import median_latency_ms, paired_speed, runtime_accuracy

log = logging.getLogger(__name__)


def _session(path, threads: int = 2, spin: bool = True):
    """An ONNX Runtime CPU session with ``threads`` threads; ``spin=False``: idle threads sleep instead of
    spinning (for two sessions timed in turn, each of which would otherwise run against the other's spinning
    pool: FP32 ResNet-20 read 11.8 ms instead of 6.4 on 2 cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise InputError(f"{path}: ONNX Runtime cannot load it ({first_line(e)})") from e


def to_onnx(model: nn.Module, path, input_shape, opset: int = 17) -> None:
    """Export with a dynamic batch axis (legacy TorchScript exporter: no onnxscript needed)."""
    refused = kinds.refusal(model, kinds.ONNX)  # a stored graph, or INT8 kernels
    if refused is not None:
        raise refused
    remove_masks(model)
    model.eval()
    x = torch.randn(tuple(input_shape))
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter on purpose (the torch.export-based one needs onnxscript); it and its
            # internals announce their deprecation on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as e:
        raise InputError(f"the model cannot be exported to ONNX: {first_line(e, 160)}") from e
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def run_onnx(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def compare(model: nn.Module, sess, input_shape, n: int = 8, data=None) -> tuple[float, float]:
    """Max abs difference between PyTorch and ONNX Runtime outputs on sample input, and the same
    relative to the largest PyTorch output (a model whose outputs are all tiny is judged on scale)."""
    x = data.head(n) if data is not None else torch.randn((n,) + tuple(input_shape[1:]))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    diff = float(np.abs(run_onnx(sess, x.numpy()) - ref).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-30)


def onnx_latency_ms(sess, input_shape, batch: int, runs: int = 20) -> float:
    """Median ms of one ONNX Runtime run at ``batch``, after a warm-up until stable (as for PyTorch)."""
    return median_latency_ms(onnx_runner(sess), input_shape, batch, runs)


def onnx_accuracy(sess, data) -> float:
    """Top-1 accuracy (%) of an ONNX Runtime session on ``data``, read in batches."""
    return runtime_accuracy(lambda x: run_onnx(sess, x), data)


class _Calib:
    """onnxruntime.quantization CalibrationDataReader over the first ``n`` samples of a data set, read a
    batch at a time (one is held in memory, not the whole calibration set)."""

    def __init__(self, data, name: str, n: int = 512, batch: int = 32):
        self.data, self.name, self.n, self.batch = data, name, n, batch
        self.rewind()

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {self.name: x[0].numpy()}

    def rewind(self):
        order = None if self.data.iterable else torch.arange(min(self.n, len(self.data)))
        self.it = iter(batches(self.data, self.batch, order))


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); True elsewhere (no such issue)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(fp32_path, int8_path, calib_data, per_channel: bool = True, reduce_range: bool | None = None) -> bool:
    """ONNX Runtime static quantization: QDQ, per-channel int8 weights, uint8 activations.

    On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels (AVX2, AVX-512) add pairs of products
    in 16 bits, which saturates and can cost many points of accuracy (ResNet-20: -9 pt here);
    weights are then quantized to 7 bits (``reduce_range``), the documented workaround. Returns
    whether the range was reduced."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as d:
        pre = Path(d) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation; quantize the raw model instead
            log.info("quant_pre_process skipped: %s", e)
            pre = Path(fp32_path)
        name = _session(pre).get_inputs()[0].name
        reduce_range = (not cpu_has_vnni()) if reduce_range is None else reduce_range
        quantize_static(
            str(pre),
            str(int8_path),
            _Calib(calib_data, name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=reduce_range,
        )
    return reduce_range


def onnx_summary(path, data=None, input_shape: tuple | None = None, threads: int = 2) -> dict[str, Any]:
    """``compress report`` for an .onnx file: params, size, latency and accuracy through ORT on ``data``
    (anything ``compress.data.as_data`` takes)."""
    import onnx

    data = None if data is None else as_data(data, arg="data")

    try:
        m = onnx.load(str(path))
    except Exception as e:
        raise InputError(f"{path}: not a readable ONNX model ({first_line(e, 120)})") from e
    from onnx import numpy_helper

    params = sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) >= 1)
    int8 = sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in (2, 3) and len(t.dims) >= 1)
    nonzero = sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in m.graph.initializer if len(t.dims) >= 1)
    sess = _session(path, threads)
    shape = None
    if input_shape:
        shape = (1,) + tuple(input_shape)[1:]
    elif data is not None:
        shape = (1,) + tuple(data.sample_shape)
    else:
        dims = sess.get_inputs()[0].shape
        if all(isinstance(d, int) for d in dims[1:]):
            shape = (1,) + tuple(dims[1:])
    out: dict[str, Any] = {
        "format": "onnx",
        "params": params,
        "int8_params": int8,
        "nonzero_params": nonzero,
        "dense_fp32_bytes": params * 4,
    }
    if shape is None:
        raise UsageError(
            f"cannot tell the ONNX model's input shape: give {param('input_shape', (1, 1, 28, 28))} or data"
        )
    out["input_shape"] = list(shape)
    if data is not None:
        out["accuracy"] = round(onnx_accuracy(sess, data), 3)
    out["latency_ms"] = {
        "batch_1": round(onnx_latency_ms(sess, shape, 1), 4),
        "batch_32": round(onnx_latency_ms(sess, shape, 32, runs=10), 4),
    }
    return out


def export(
    model: nn.Module,
    path,
    input_shape,
    int8: bool = False,
    calib_data=None,
    eval_data=None,
    tol: float = 1e-4,
    force: bool = False,
    threads: int = 2,
    on_step=None,
    fmt: str = "onnx",
) -> dict[str, Any]:
    """Write ``path`` (FP32 ONNX, or INT8 QDQ with ``int8``; ``fmt="openvino"``: the same model as OpenVINO IR,
    ``NAME.xml`` + ``NAME.bin``); return the comparison numbers. ``calib_data``, ``eval_data``: anything
    ``compress.data.as_data`` takes. ``on_step(text)`` hears of each step as it starts (they take seconds each)."""
    calib_data = None if calib_data is None else as_data(calib_data, "calibration data", arg="calib_data")
    eval_data = None if eval_data is None else as_data(eval_data, "evaluation data", arg="eval_data")
    step = on_step or (lambda text: None)
    refused = kinds.refusal(model, kinds.ONNX)  # before any work
    if refused is not None:
        raise refused
    if fmt not in ("onnx", "openvino"):
        raise UsageError(f"format must be onnx or openvino, got {fmt!r}")
    if fmt == "openvino":
        ov.ir_paths(path)
        ov._ov()  # installed, before any work
    if int8 and calib_data is None:
        raise UsageError(
            "INT8 needs calibration data: calib_data (--calib-data SPEC), a few hundred representative inputs"
        )
    if Path(path).exists() and not force:  # before the work, not after it
        raise InputError(f"{path} exists; pass {param('force')} to overwrite it")
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        step("exporting to ONNX and checking it against PyTorch")
        to_onnx(model, fp32, input_shape)
        sess = _session(fp32, threads)
        diff, rel = compare(model, sess, input_shape, data=eval_data)
        res["max_abs_diff"], res["max_rel_diff"] = diff, rel
        if rel > tol:
            raise InputError(
                f"ONNX output differs from PyTorch by {diff:.2e}, {rel:.2e} of the largest output "
                f"(> --tol {tol:g}); not written"
            )
        res["fp32"] = {"bytes": os.path.getsize(fp32)}
        if eval_data is not None:
            res["fp32"]["accuracy"] = round(onnx_accuracy(sess, eval_data), 3)
        final = fp32
        if int8:
            final = Path(d) / "int8.onnx"
            step(f"calibrating INT8 activations on {min(512, len(calib_data))} samples")
            res["reduced_range"] = quantize_int8(fp32, final, calib_data)
            if res["reduced_range"]:
                step("this CPU has no VNNI: INT8 weights use 7 bits to avoid ONNX Runtime's u8 x s8 saturation")
            q = _session(final, threads)
            res["int8"] = {"bytes": os.path.getsize(final)}
            if eval_data is not None:
                res["int8"]["accuracy"] = round(onnx_accuracy(q, eval_data), 3)
            step("timing FP32 and INT8 in ONNX Runtime, interleaved")
            _timed_pair(
                res,
                "fp32",
                "int8",
                onnx_runner(_session(fp32, threads, spin=False)),
                onnx_runner(_session(final, threads, spin=False)),
                input_shape,
            )
        else:
            step("timing FP32 ONNX Runtime")
            res["fp32"]["latency_ms_batch_32"] = round(onnx_latency_ms(sess, input_shape, 32, runs=20), 4)
        if fmt == "onnx":
            write_bytes(path, final.read_bytes(), force)
            return res

        def reference(x):
            with torch.no_grad():
                return model.eval()(x).numpy()

        o: dict[str, Any] = {}
        res["openvino"] = o
        if int8:  # OpenVINO's own FP32 beside its INT8: the speed-up a user gets from INT8 in OpenVINO
            step("converting FP32 to OpenVINO IR and checking it")
            fp32_ir = Path(d) / "fp32-ir" / "m.xml"
            o["fp32"] = ov.write(
                fp32, fp32_ir, reference, input_shape, check_tol=tol, threads=threads, eval_data=eval_data, mkdir=True
            )
        step(f"converting to OpenVINO IR ({'INT8' if int8 else 'FP32'}) and checking it")
        o["int8" if int8 else "fp32"] = ov.write(
            final,
            path,
            reference,
            input_shape,
            check_tol=None if int8 else tol,
            force=force,
            threads=threads,
            eval_data=eval_data,
        )
        if int8:
            o["int8"]["size_note"] = ov.size_note(o["fp32"], o["int8"])  # why it is not the smaller one, if not
            step("timing FP32 and INT8 in OpenVINO, interleaved")
            _timed_pair(o, "fp32", "int8", ov.runner(fp32_ir, 32, threads), ov.runner(path, 32, threads), input_shape)
        else:
            o["fp32"]["latency_ms_batch_32"] = round(ov.latency_ms(path, input_shape, 32, threads), 4)
    return res


def onnx_runner(sess):
    """A callable of a CPU tensor running ``sess`` (for ``metrics.latency_stats``)."""
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})


def _timed_pair(res: dict, a: str, b: str, run_a, run_b, input_shape) -> None:
    """``res[a]``, ``res[b]`` get their batch-32 ms, timed interleaved; ``res`` the speed-up of ``b`` with its 95%
    interval and the verdict it allows."""
    t = paired_speed(run_a, run_b, input_shape, 32)
    res[a]["latency_ms_batch_32"], res[b]["latency_ms_batch_32"] = t["before_ms"], t["after_ms"]
    res[f"{b}_speedup"], res[f"{b}_speedup_interval"], res[f"{b}_verdict"] = t["speedup"][1], t["speedup"], t["verdict"]
