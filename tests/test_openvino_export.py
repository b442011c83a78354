"""export --format openvino: OpenVINO IR (FP32 and INT8), checked against PyTorch; skipped without OpenVINO."""

import sys

import numpy as np
import pytest
import torch

from compress.model_io import save_model
from tests.helpers import one_line_error


def test_without_openvino_the_export_says_how_to_get_it(lenet5_trained, cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: importing it raises ImportError
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli("export", tmp_path / "m.pt", "-o", tmp_path / "m.xml")
    assert one_line_error(r) and "compress[openvino]" in r.err and not (tmp_path / "m.xml").exists()


def test_fp32_ir_computes_what_pytorch_computes(lenet5_trained, mnist_small, tmp_path, cli):
    ov = pytest.importorskip("openvino")
    from compress.export import export

    _, va = mnist_small
    res = export(lenet5_trained, tmp_path / "m.xml", (1, 1, 28, 28), fmt="openvino", eval_data=va)
    assert (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file()
    compiled = ov.Core().compile_model(str(tmp_path / "m.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = va.batch(torch.arange(16))[0]
    with torch.no_grad():
        ref = lenet5_trained.eval()(x).numpy()
    got = np.asarray(compiled(x.numpy())[compiled.outputs[0]])  # a batch of 16 through the dynamic batch axis
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert res["openvino"]["fp32"]["int8_layers"][0] == 0 and res["openvino"]["fp32"]["latency_ms_batch_32"] > 0
    save_model(lenet5_trained, tmp_path / "m.pt")
    before = (tmp_path / "m.bin").read_bytes()
    r = cli("export", tmp_path / "m.pt", "-o", tmp_path / "m.xml")  # exists: refused before any work
    assert one_line_error(r) and "exists" in r.err and (tmp_path / "m.bin").read_bytes() == before
    r = cli("export", tmp_path / "m.pt", "--format", "openvino", "-o", tmp_path / "m.onnx")
    assert one_line_error(r) and "NAME.xml" in r.err


def test_int8_ir_runs_its_convolutions_as_integers_and_keeps_accuracy(lenet5_trained, mnist_small, tmp_path, cli):
    pytest.importorskip("openvino")
    tr, va = mnist_small
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "export",
        tmp_path / "m.pt",
        "--int8",
        "--calib-data",
        "mnist5k?limit=256",
        "--data",
        "mnist5k?limit=500",
        "-o",
        tmp_path / "q.xml",
        "--json",
        tmp_path / "q.json",
    )
    assert r.code == 0, r.err
    import json

    res = json.loads((tmp_path / "q.json").read_text())
    o = res["openvino"]
    n, total = o["int8"]["int8_layers"]
    assert total == 4 and n == 4  # conv1, conv2, fc1, fc2: every one in u8/i8 kernels
    assert o["int8"]["accuracy"] >= o["fp32"]["accuracy"] - 1.0
    assert "8-bit integers" in r.out and "INT8 vs FP32 in OpenVINO, batch 32:" in r.out
    assert o["int8"]["bytes"] < 0.6 * o["fp32"]["bytes"]
