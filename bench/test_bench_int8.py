"""quantize --activations: INT8 that PyTorch executes, beside FP32 PyTorch and ONNX Runtime FP32 / INT8 of the
same model, on this machine (batch 32, the threads compress times with)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress import data as data_mod
from compress.export import _session, onnx_accuracy, onnx_latency_ms, quantize_int8, to_onnx
from compress.formats import save_model
from compress.metrics import latencies, speed_change
from compress.quantize import to_int8
from compress.quantize.int8 import OBSERVERS
from compress.train import evaluate, fit

from .conftest import CACHE, VAL_FRACTION, mnist_test_dir, once, trained


def _mobilenetv2() -> nn.Module:
    """pytorchcv's MobileNetV2 (depthwise, inverted residuals) for 32x32 digits: its 7x7 final pool made
    adaptive, trained here for 10 epochs on the mnist5k training split (3 channels), cached."""
    from pytorchcv.models.mobilenetv2 import mobilenetv2_w1

    from compress.config import FineTune
    from compress.formats import load_model

    path = CACHE / "mobilenetv2-w1-s32-e10.pt"
    if path.exists():
        return load_model(path)
    torch.manual_seed(0)
    m = mobilenetv2_w1(num_classes=10)
    m.features.final_pool = nn.AdaptiveAvgPool2d(1)
    tr, _ = data_mod.split(data_mod.load("mnist5k?size=32&channels=3"), VAL_FRACTION, seed=0)
    fit(m, tr, FineTune(epochs=10, lr=2e-3, augment=2))
    CACHE.mkdir(exist_ok=True)
    save_model(m.eval(), path)
    return m.eval()


def _bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model holds while it runs (INT8 weights count one byte each)."""
    from compress.quantize.int8 import Int8Model, _quiet

    if isinstance(model, Int8Model):
        total = len(model.arch_cpz)
        with _quiet():
            for v in model.inner.state_dict().values():
                for t in (v if isinstance(v, tuple) else (v,)):
                    if isinstance(t, torch.Tensor):
                        total += (t.int_repr() if t.is_quantized else t).nbytes
        return total
    return sum(t.nbytes for t in model.state_dict().values())


CASES = {"resnet20 (zoo, trained)": (lambda: trained("resnet20", 4, size=32, lr=2e-3), ""),
         "mobilenetv2 (pytorchcv, trained)": (_mobilenetv2, "&channels=3")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_int8_in_pytorch(benchmark, eval_sets, name, tmp_path):  # eval_sets: names the data as the others do
    build, chan = CASES[name]
    model = build().eval()
    shape = (1, 3 if chan else 1, 32, 32)
    d = mnist_test_dir()
    test = data_mod.load(f"{d}?size=32{chan}") if d is not None else \
        data_mod.split(data_mod.load(f"mnist5k?size=32{chan}"), VAL_FRACTION, seed=0)[1]
    calib = data_mod.load(f"mnist5k?size=32&limit=512{chan}")
    base_acc = evaluate(model, test)
    info: dict = {"case": name, "eval_data": f"{eval_sets[32][1]}", "fp32_accuracy": round(base_acc, 2)}
    made = {}
    once(benchmark, lambda: made.update(q=to_int8(model, calib, shape, observer="histogram")))
    for obs in OBSERVERS:
        q = made["q"] if obs == "histogram" else to_int8(model, calib, shape, observer=obs)
        info[f"int8_{obs}_accuracy"] = round(evaluate(q, test), 2)
    q = made["q"]
    fp, i8 = latencies([model, q], shape)
    info["fp32_ms_b32"], info["int8_ms_b32"] = fp["batch_32"], i8["batch_32"]
    info["pytorch_speedup_b32"] = i8["speedup"]["batch_32"]
    info["verdict"] = speed_change(fp["batch_32"], i8["batch_32"], i8["speedup"]["batch_32"])
    save_model(model, tmp_path / "fp32.pt")
    save_model(q, tmp_path / "int8.pt")
    info["file_ratio"] = round((tmp_path / "int8.pt").stat().st_size / (tmp_path / "fp32.pt").stat().st_size, 3)
    info["memory_ratio"] = round(_bytes(q) / _bytes(model), 3)
    to_onnx(copy.deepcopy(model), tmp_path / "fp32.onnx", shape)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib)
    s32, s8 = _session(tmp_path / "fp32.onnx", 2), _session(tmp_path / "int8.onnx", 2)
    info["ort_fp32_ms_b32"] = round(onnx_latency_ms(s32, shape, 32, runs=30), 3)
    info["ort_int8_ms_b32"] = round(onnx_latency_ms(s8, shape, 32, runs=30), 3)
    info["ort_int8_accuracy"] = round(onnx_accuracy(s8, test), 2)
    benchmark.extra_info.update(info)
    assert info["int8_histogram_accuracy"] >= base_acc - 1.0
