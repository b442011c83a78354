"""OpenVINO as a second runtime for Intel CPUs: the checked ONNX export (FP32, or INT8 QDQ calibrated as for ONNX
Runtime) converted to OpenVINO IR (``NAME.xml`` + ``NAME.bin``), checked against PyTorch and timed in OpenVINO.

OpenVINO reads a QDQ model's quantize/dequantize pairs as FakeQuantize and runs the convolutions and matrix
products between them as INT8 (its low-precision transformations); compress writes no kernels. The IR is data
(an XML graph of OpenVINO's operations and a weights file): writing it runs no code of the model's, and
OpenVINO loads it without Python.

Optional: ``pip install 'compress[openvino]'``; without it ``export --format openvino`` says so in one line.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import InputError, UsageError, first_line, param
from compress.filesystem import atomic_write
from compress.measure import median_latency_ms, runtime_accuracy


def _ov():
    # an optional dependency ([project.optional-dependencies] openvino), imported by name: the import check of
    # the required dependencies (../shared/tools/undeclared_imports.py) reads only [project] dependencies
    try:
        return importlib.import_module("openvino")
    except ImportError as e:
        raise UsageError(
            "OpenVINO is not installed: pip install 'compress[openvino]' (or openvino), or export ONNX"
        ) from e


def available() -> bool:
    try:
        _ov()
    except UsageError:
        return False
    return True


def ir_paths(path) -> tuple[Path, Path]:
    """(NAME.xml, NAME.bin): an IR is two files; the .bin holds the weights the .xml names."""
    path = Path(path)
    if path.suffix != ".xml":
        raise UsageError(f"{path}: OpenVINO IR is written as NAME.xml (with NAME.bin beside it)")
    return path, path.with_suffix(".bin")


def convert(onnx_path, xml_path) -> None:
    """ONNX -> OpenVINO IR at ``xml_path``. FP32 weights stay FP32 (the FP16 compression OpenVINO applies by
    default would change what was checked); quantized weights (a QDQ model's) are stored as INT8 constants, as
    OpenVINO's own weight compression of FakeQuantize-d constants stores them (older OpenVINO converters left
    them FP32)."""
    ov = _ov()
    try:
        model = ov.convert_model(str(onnx_path))
        _compress_quantized_weights(model)
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except Exception as e:  # OpenVINO raises its own untyped errors
        raise InputError(f"OpenVINO cannot convert the ONNX model ({first_line(e, 160)})") from e


def _compress_quantized_weights(model) -> None:
    """FakeQuantize-d FP32 weight constants -> INT8 constants (OpenVINO's offline transformation; a model without
    FakeQuantize is left as it is). An OpenVINO without it keeps them FP32, and ``storage`` says so."""
    try:
        from openvino._offline_transformations import compress_quantize_weights_transformation
    except ImportError:
        return
    compress_quantize_weights_transformation(model)


def storage(xml_path) -> dict[str, Any]:
    """What an IR's two files hold: ``xml_bytes`` (the graph), ``bin_bytes`` (the weights), ``bytes`` (both) and
    ``constants``: the bytes of its constants by element type ({"i8": ..., "f32": ...}), read from the IR."""
    xml, bin_ = ir_paths(xml_path)
    by_type: dict[str, int] = {}
    for op in _ov().Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant":
            t = op.get_output_element_type(0).get_type_name()
            by_type[t] = by_type.get(t, 0) + int(op.get_byte_size())
    sizes = {"xml_bytes": xml.stat().st_size, "bin_bytes": bin_.stat().st_size if bin_.exists() else 0}
    return {**sizes, "bytes": sizes["xml_bytes"] + sizes["bin_bytes"], "constants": by_type}


def size_note(fp32: dict, int8: dict) -> str | None:
    """Why an INT8 IR is not the smaller one, from both IRs' ``storage``: weights left in FP32, or a graph
    (.xml) grown by its quantize/dequantize operations past what the INT8 weights saved. None if it is smaller."""
    c = int8.get("constants", {})
    if c.get("f32", 0) > c.get("i8", 0) + c.get("u8", 0):
        return (
            f"its weights are stored in FP32 ({c.get('f32', 0):,} bytes of FP32 constants against "
            f"{c.get('i8', 0) + c.get('u8', 0):,} of INT8): this OpenVINO did not compress them, though it runs "
            "them as INT8"
        )
    if int8["bytes"] <= fp32["bytes"]:
        return None
    return (
        f"larger than the FP32 IR although its weights are INT8 (.bin {int8['bin_bytes']:,} bytes against "
        f"{fp32['bin_bytes']:,}): its graph, the .xml, describes every quantize/dequantize step "
        f"({int8['xml_bytes']:,} bytes against {fp32['xml_bytes']:,})"
    )


def compile_model(xml_path, threads: int = 2, batch: int | None = None):
    """The IR compiled for the CPU with ``threads`` threads, in FP32 (on CPUs with bfloat16 units OpenVINO
    would otherwise run an FP32 model in bfloat16: not what was exported); ``batch``: a static batch size."""
    ov = _ov()
    core = ov.Core()
    model = core.read_model(str(xml_path))
    if batch is not None:
        model.reshape({model.inputs[0].any_name: [batch, *list(model.inputs[0].get_partial_shape())[1:]]})
    return core.compile_model(
        model,
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )


def run(compiled, x: np.ndarray) -> np.ndarray:
    return np.asarray(compiled(x)[compiled.outputs[0]])


def runner(xml_path, batch: int, threads: int = 2):
    """A callable of a CPU tensor of ``batch`` samples running the IR compiled for that batch (for
    ``metrics.latency_stats``)."""
    request = compile_model(xml_path, threads, batch).create_infer_request()
    return lambda x: request.infer({0: x.numpy()})


def latency_ms(xml_path, input_shape, batch: int, threads: int = 2, runs: int = 20) -> float:
    """Median ms of one inference at ``batch`` (compiled for that batch), after a warm-up until stable: timed
    as ONNX Runtime is (``metrics.median_latency_ms``)."""
    return median_latency_ms(runner(xml_path, batch, threads), input_shape, batch, runs)


COMPUTE = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def integer_layers(compiled) -> tuple[int, int]:
    """(layers that run in 8-bit integers, layers that compute: convolutions and matrix products), as the
    compiled model's runtime graph says (its ``runtimePrecision``)."""
    n = total = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in COMPUTE:
            total += 1
            n += "runtimePrecision" in info and info["runtimePrecision"].astype(str) in ("u8", "i8")
    return n, total


def accuracy(compiled, data) -> float:
    """Top-1 accuracy (%) of a compiled model on ``data``, read in batches."""
    return runtime_accuracy(lambda x: run(compiled, x), data)


def write(
    onnx_path,
    path,
    reference,
    input_shape,
    *,
    check_tol: float | None,
    force: bool = False,
    threads: int = 2,
    eval_data=None,
    mkdir: bool = False,
) -> dict[str, Any]:
    """Convert ``onnx_path`` into the IR ``path`` (+ .bin), both written atomically once checked: its outputs
    against ``reference(x) -> np.ndarray`` (PyTorch) within ``check_tol`` of the largest output (None: INT8,
    judged by accuracy instead); returns bytes (``storage``: .xml + .bin, and the weights' element types), latency
    at batch 32 and accuracy on ``eval_data``."""
    import torch

    xml, bin_ = ir_paths(path)
    if mkdir:
        xml.parent.mkdir(parents=True, exist_ok=True)
    for p in (xml, bin_):
        if p.exists() and not force:
            raise InputError(f"{p} exists; pass {param('force')} to overwrite it")
    with tempfile.TemporaryDirectory() as d:
        tmp_xml = Path(d) / xml.name
        convert(onnx_path, tmp_xml)
        compiled = compile_model(tmp_xml, threads)
        x = eval_data.head(8) if eval_data is not None else torch.randn((8,) + tuple(input_shape[1:]))
        ref = reference(x)
        diff = float(np.abs(run(compiled, x.numpy()) - ref).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-30)
        if check_tol is not None and rel > check_tol:
            raise InputError(
                f"OpenVINO output differs from PyTorch by {diff:.2e}, {rel:.2e} of the largest output "
                f"(> --tol {check_tol:g}); not written"
            )
        n, total = integer_layers(compiled)
        res: dict[str, Any] = {
            "max_abs_diff": diff,
            "max_rel_diff": rel,
            "int8_layers": [n, total],
            **storage(tmp_xml),
        }  # the bytes of both files: the .xml and its .bin
        if eval_data is not None:
            res["accuracy"] = round(accuracy(compiled, eval_data), 3)
        with atomic_write(xml, force) as tx:  # the weights first: the .xml that names them appears last
            with atomic_write(bin_, force) as tb:
                tb.write_bytes(tmp_xml.with_suffix(".bin").read_bytes())
            tx.write_bytes(tmp_xml.read_bytes())
    return res
