"""quantize --activations: static INT8 that PyTorch runs as integers, and its data-only file."""

import copy
import importlib

import pytest
import torch

from compress import data as data_mod
from compress.errors import InputError, UsageError
from compress.model_io import load_model, save_model
from compress.quantize.int8 import Int8Model, backend
from compress.quantize.int8_file import INT8_KEY
from compress.quantize.int8_stage import to_int8
from compress.scoring import evaluate
from tests.helpers import one_line_error

ENGINES = ["pt2e", "fx"]


def _quantized_layers(q: Int8Model) -> list[str]:
    """The layers that run on INT8 weights: PT2E's convolutions and linears fed by a dequantized integer
    weight, FX's quantized modules."""
    if q.engine == "pt2e":
        from compress.quantize.pt2e import int8_layers

        return int8_layers(q.inner)
    mods = q.inner.named_modules()
    return sorted(
        {n.removesuffix("._packed_params") for n, m in mods if type(m).__module__.startswith("torch.ao.nn.quantized")}
    )


def test_lowering_to_int8_is_its_own_verb_and_quantize_refuses_it(lenet5_trained, mnist_small):
    import compress

    tr, _ = mnist_small
    before = {k: v.clone() for k, v in lenet5_trained.state_dict().items()}
    with pytest.raises(UsageError, match=r"in place.*compress\.lower_int8\(model, Int8Config"):
        compress.quantize_(lenet5_trained, compress.Int8Config(), calib_data=tr)
    q = compress.lower_int8(lenet5_trained, compress.Int8Config(observer="minmax"), calib_data=tr)
    assert isinstance(q, Int8Model) and q is not lenet5_trained
    ref = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax")  # the same lowering, the same integers
    x = tr.batch(torch.arange(8))[0]
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    assert all(
        torch.equal(v, before[k]) for k, v in lenet5_trained.state_dict().items()
    )  # the float model is as it was


@pytest.mark.parametrize("engine", ENGINES)
def test_lenet5_runs_as_int8_and_keeps_its_accuracy(lenet5_trained, mnist_small, engine):
    tr, va = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), engine=engine)
    assert q.engine == engine
    kinds = _quantized_layers(q)
    assert len(kinds) >= 4  # conv1, conv2, fc1, fc2 are INT8 kernels, not float layers
    # the observer was chosen: every candidate tried on held-out calibration samples, the least error kept
    errors = dict(q.compress_int8["observer_errors"])
    assert q.compress_int8["observer"] == min(errors, key=errors.__getitem__) and len(errors) >= 3
    x = va.batch(torch.arange(32))[0]
    with torch.no_grad():
        ref, out = lenet5_trained(x), q(x)
    assert not torch.equal(ref, out) and float((ref - out).abs().max()) < 0.1 * float(ref.abs().max())
    assert evaluate(q, va) >= evaluate(lenet5_trained, va) - 1.0
    assert q.compress_int8["calibration"].endswith("512 samples")
    assert q.compress_int8["backend"] == backend() == "x86"  # this machine: x86 kernels (ARM: qnnpack)


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_file_is_data_reloads_without_trust_and_is_small(lenet5_trained, mnist_small, tmp_path, engine):
    tr, va = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine=engine)
    save_model(q, tmp_path / "q.pt")
    save_model(lenet5_trained, tmp_path / "f.pt")
    assert (tmp_path / "q.pt").stat().st_size < 0.35 * (tmp_path / "f.pt").stat().st_size
    raw = torch.load(tmp_path / "q.pt", weights_only=True)  # plain data: tensors, bytes, numbers, strings
    assert set(raw) == {"compress_cpz", INT8_KEY, "int8_state"}
    assert all(not t.is_quantized for t in raw["int8_state"].values())
    if engine == "pt2e":  # each activation's scale and zero point, by its quantize node's name
        rows = raw[INT8_KEY]["qparams"]
        assert len(rows) >= 8 and all(isinstance(r[0], str) and r[1] > 0 for r in rows)
    again = load_model(tmp_path / "q.pt")
    x = va.batch(torch.arange(16))[0]
    assert isinstance(again, Int8Model) and again.engine == engine and torch.equal(again(x), q(x))
    with pytest.raises(UsageError, match=".pt"):
        save_model(q, tmp_path / "q.cpz")


@pytest.mark.parametrize("damage", ["drop", "shape", "table", "extra", "engine", "offset", "dtype", "index"])
def test_a_damaged_int8_file_is_refused(lenet5_trained, mnist_small, tmp_path, damage, cli):
    tr, _ = mnist_small
    save_model(to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine="fx"), tmp_path / "q.pt")
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    index, state = obj[INT8_KEY]["index"], obj["int8_state"]
    row = next(r for r in index if r[0].endswith("#int"))
    if damage == "drop":
        index.remove(row)
    elif damage == "shape":
        row[2] = [1]
    elif damage == "table":
        obj[INT8_KEY]["backend"] = "os.system"
    elif damage == "engine":  # made for other kernels: its state does not fit what this build rebuilds
        obj[INT8_KEY]["backend"] = "qnnpack"
    elif damage == "offset":  # a row that points past its buffer: refused before it is sliced
        row[3] = len(state[row[1]])
    elif damage == "dtype":
        state["int8"] = state["int8"].float()
    elif damage == "index":
        obj[INT8_KEY]["index"] = "conv1"
    else:
        index.append(["conv1.weight#int_extra", "int8", [1], 0])
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="INT8 file"):
        load_model(tmp_path / "bad.pt")
    assert one_line_error(cli("report", tmp_path / "bad.pt", "--input-shape", "1,1,28,28"))


def test_an_int8_file_of_the_first_layout_still_loads(lenet5_trained, mnist_small, tmp_path):
    """Version 1 stored one tensor per entry (zero points as int64); version 2 packs them by dtype."""
    from compress.quantize.int8_file import _unpack

    tr, va = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine="fx")
    save_model(q, tmp_path / "q.pt")
    obj = torch.load(tmp_path / "q.pt", weights_only=True)
    flat = _unpack(obj["int8_state"], obj[INT8_KEY].pop("index"))
    obj["int8_state"] = {k: v.long() if k.endswith("#zero_points") else v.clone() for k, v in flat.items()}
    obj[INT8_KEY]["version"] = 1
    torch.save(obj, tmp_path / "v1.pt")
    x = va.batch(torch.arange(16))[0]
    assert torch.equal(load_model(tmp_path / "v1.pt")(x), q(x))


def test_bad_calibration_data_is_one_line(lenet5_trained, cli, tmp_path):
    save_model(lenet5_trained, tmp_path / "m.pt")
    empty = data_mod.TensorData(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), "empty")
    with pytest.raises(UsageError, match="calibration"):
        to_int8(lenet5_trained, empty, (1, 1, 28, 28))
    nan = data_mod.TensorData(torch.full((8, 1, 28, 28), 0.5), torch.zeros(8, dtype=torch.long), "nan")
    nan.x[3, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        to_int8(lenet5_trained, nan, (1, 1, 28, 28))
    r = cli("quantize", tmp_path / "m.pt", "--activations", "-o", tmp_path / "q.pt")
    assert r.code == 2 and "--calib-data" in r.err and not (tmp_path / "q.pt").exists()
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--calib-data",
        "mnist5k?size=32&limit=64",
        "-o",
        tmp_path / "q.pt",
    )
    assert one_line_error(r) and not (tmp_path / "q.pt").exists()  # 32x32 digits into a 28x28 model
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--bits",
        "4",
        "--calib-data",
        "mnist5k",
        "-o",
        tmp_path / "q.pt",
    )
    assert r.code == 2 and "--activations" in r.err


def test_cli_prints_before_and_after(lenet5_trained, cli, tmp_path):
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--calib-data",
        "mnist5k?limit=256",
        "--test-data",
        "mnist5k?limit=500",
        "--no-latency",
        "-o",
        tmp_path / "q.pt",
    )
    assert r.code == 0, r.err
    assert "file bytes" in r.out and "test accuracy % (mnist5k?limit=500, 500 samples)" in r.out, r.out
    assert "quantize/int8" in r.out and "INT8 weights and activations" in r.err
    r = cli("report", tmp_path / "q.pt", "--no-latency")
    assert r.code == 0 and "INT8 weights and activations" in r.out


@pytest.mark.parametrize(
    "spec,size",
    [
        ("pytorchcv.models.resnet_cifar:resnet20_cifar10", 32),  # residual
        pytest.param(  # depthwise, inverted residual (slow: 224x224; MobileNetV3 below has both)
            "pytorchcv.models.mobilenetv2:mobilenetv2_w1", 224, marks=pytest.mark.slow
        ),
        ("pytorchcv.models.seresnet_cifar:seresnet20_cifar10", 32),  # squeeze-excitation
        pytest.param(  # dense concatenation (slow: 40 layers, 25 s; bench/test_bench_int8.py runs DenseNet-40-BC)
            "pytorchcv.models.densenet_cifar:densenet40_k12_cifar10", 32, marks=pytest.mark.slow
        ),
        # channel shuffle, grouped; one ReLU module called in three places of a unit (one_partition_per_call)
        ("pytorchcv.models.shufflenetv2:shufflenetv2_wd2", 224),
        ("pytorchcv.models.resnext_cifar:resnext20_16x4d_cifar10", 32),  # grouped convolutions
        ("pytorchcv.models.mobilenetv3:mobilenetv3_small_w7d20", 224),  # hard-swish, SE with hard-sigmoid
    ],
)
def test_real_architectures_lower_to_int8_and_reload_with_their_code(spec, size, tmp_path, request):
    mod, fn = spec.split(":")
    shape = (1, 3, size, size)
    if fn == "mobilenetv3_small_w7d20":  # lowered once for this test and the hard-swish one below
        m, res = request.getfixturevalue("mobilenetv3_int8")
        q = res.model
    else:
        torch.manual_seed(0)
        m = getattr(importlib.import_module(mod), fn)(num_classes=10).eval()
        calib = data_mod.TensorData(torch.rand(8, 3, size, size), torch.zeros(8, dtype=torch.long), "random")
        q = to_int8(copy.deepcopy(m), calib, shape, observer="minmax")
    assert q.engine == "pt2e", q.compress_int8.get("engine_note")  # the engine PyTorch keeps
    assert len(_quantized_layers(q)) > 10
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = q(x)
    assert out.shape == m(x).shape
    save_model(q, tmp_path / "q.pt")  # pytorchcv's classes: the file names them, --arch rebuilds them
    with pytest.raises(InputError, match="arch="):
        load_model(tmp_path / "q.pt")
    assert torch.equal(load_model(tmp_path / "q.pt", arch=spec)(x), out)


@pytest.mark.parametrize("engine", ENGINES)
def test_layers_kept_float_stay_float_and_the_file_says_so(lenet5_trained, mnist_small, tmp_path, cli, engine):
    tr, va = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), keep_float=["fc2"], observer="minmax", engine=engine)
    layers = _quantized_layers(q)
    assert "fc2" not in layers and "fc1" in layers
    assert q.compress_int8["keep_float"] == ["fc2"]
    save_model(q, tmp_path / "q.pt")
    again = load_model(tmp_path / "q.pt")
    assert "fc2" not in _quantized_layers(again) and "fc1" in _quantized_layers(again)
    x = va.batch(torch.arange(8))[0]
    assert torch.equal(again(x), q(x))
    with pytest.raises(UsageError, match="matches no"):
        to_int8(lenet5_trained, tr, (1, 1, 28, 28), keep_float=["fc9"])
    if engine == "fx":
        return
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--exclude",
        "conv1",
        "--calib-data",
        "mnist5k?limit=128",
        "--no-latency",
        "-o",
        tmp_path / "k.pt",
    )
    assert r.code == 0 and "kept in float: conv1" in r.err, r.err
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--exclude",
        "fc9",
        "--calib-data",
        "mnist5k?limit=128",
        "--no-latency",
        "-o",
        tmp_path / "k9.pt",
    )
    assert one_line_error(r) and "matches no" in r.err and not (tmp_path / "k9.pt").exists()


def test_percentile_ranges_ignore_an_outlier_that_min_max_and_histogram_follow(lenet5_trained, mnist_small):
    tr, va = mnist_small
    x, y = tr.batch(torch.arange(512))
    x = x.clone()
    x[0] *= 100  # one corrupt calibration image stretches a min-max range 100-fold
    calib = data_mod.TensorData(x, y, "calibration with one outlier")
    base = evaluate(lenet5_trained, va)
    acc = {
        obs: evaluate(to_int8(lenet5_trained, calib, (1, 1, 28, 28), observer=obs), va)
        for obs in ("minmax", "percentile")
    }
    # every ordinary activation lands on a handful of levels: -29 pt with 8-bit activations (AVX-512 VNNI), more
    # with x86's 7-bit ones without VNNI
    assert acc["minmax"] < base - 20
    assert acc["percentile"] > base - 10 and acc["percentile"] > acc["minmax"] + 20


@pytest.mark.parametrize("engine", ENGINES)
def test_qat_trains_the_model_that_runs_and_its_file_reloads(lenet5_trained, mnist_small, tmp_path, engine):
    from compress.config import FineTune
    from compress.method import Context
    from compress.quantize.int8_stage import Int8Config, Int8Lowering

    tr, va = mnist_small
    method = Int8Lowering(
        copy.deepcopy(lenet5_trained),
        Int8Config(finetune=FineTune(epochs=0.5, lr=1e-4), engine=engine),
        Context(train=tr),
    )
    method.attach()
    before = {k: v.clone() for k, v in method.model.state_dict().items() if k.endswith("weight")}
    method.fine_tune()
    trained = method.model.eval()
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items() if k in before)
    assert method.frozen  # the last 30% of the steps ran with batch-norm statistics and ranges frozen
    q = method.finalize()
    x = va.batch(torch.arange(len(va)))[0]
    with torch.no_grad():  # the fake-quantized model it trained computes what the INT8 kernels compute
        fake, real = trained(x), q(x)
    assert float((fake.argmax(1) == real.argmax(1)).float().mean()) >= 0.98
    assert float((fake - real).norm() / fake.norm()) < 0.05
    ptq = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine=engine)
    assert evaluate(q, va) >= evaluate(ptq, va) - 1.5  # (199 validation digits: 0.5 pt each)
    assert q.compress_int8["qat"] == f"0.5 epochs on {tr.name}"
    save_model(q, tmp_path / "qat.pt")
    assert torch.equal(load_model(tmp_path / "qat.pt")(x), q(x))  # rebuilt from the PTQ skeleton: the same graph


def test_cli_qat_needs_training_data(lenet5_trained, cli, tmp_path):
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--epochs",
        "1",
        "--calib-data",
        "mnist5k?limit=64",
        "-o",
        tmp_path / "q.pt",
    )
    assert one_line_error(r) and "--train-data" in r.err and not (tmp_path / "q.pt").exists()
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--epochs",
        "0.2",
        "--train-data",
        "mnist5k?limit=600",
        "--no-latency",
        "-o",
        tmp_path / "q.pt",
    )
    assert r.code == 0 and "quantization-aware: 0.2 epochs" in r.err, r.err
    assert isinstance(load_model(tmp_path / "q.pt"), Int8Model)


def test_pipeline_int8_stage_tries_qat_only_when_ptq_misses_the_budget(lenet5_trained, mnist_small):
    from compress.search import pipeline

    tr, va = mnist_small
    recipe = {"stage": [{"method": "int8", "observer": "minmax", "finetune": {"epochs": [0, 0.3], "lr": 1e-4}}]}
    q, summary = pipeline(copy.deepcopy(lenet5_trained), tr, recipe, max_accuracy_drop=1.0, val_data=va, latency=False)
    tried = summary.stages[0].tried
    assert isinstance(q, Int8Model) and len(tried) == 1 and tried[0].value == 0  # PTQ within budget: no QAT
    assert summary.timeline[-1]["macs"] == summary.timeline[0]["macs"]
    assert [t["stage"] for t in summary.timeline] == ["dense fp32", "int8", "INT8 file"]
    assert summary.ratio > 3  # 4-byte floats -> 1-byte integers, with the file's own overhead
    x, y = tr.batch(torch.arange(len(tr)))
    x = x.clone()
    x[0] *= 100  # the first calibration sample is corrupt: PTQ's min-max ranges are ruined, the search goes on
    _, summary = pipeline(
        copy.deepcopy(lenet5_trained),
        data_mod.TensorData(x, y, "outlier"),
        recipe,
        max_accuracy_drop=1.0,
        val_data=va,
        latency=False,
    )
    tried = summary.stages[0].tried
    assert [t.value for t in tried] == [0, 0.3] and not tried[0].within_budget


def test_a_recipe_with_an_int8_stage_writes_a_pt(lenet5_trained, cli, tmp_path):
    save_model(lenet5_trained, tmp_path / "m.pt")
    (tmp_path / "r.toml").write_text('[[stage]]\nmethod = "int8"\nfinetune = { epochs = [0, 1] }\n')
    r = cli(
        "pipeline",
        tmp_path / "m.pt",
        "--train-data",
        "mnist5k?limit=300",
        "--recipe",
        tmp_path / "r.toml",
        "-o",
        tmp_path / "out.cpz",
    )
    assert one_line_error(r) and "NAME.pt" in r.err


def test_no_method_changes_an_int8_model_and_int8_ends_a_recipe(lenet5_trained, mnist_small, tmp_path, cli):
    from compress.method import prune_
    from compress.prune import ThresholdConfig
    from compress.recipe import Recipe

    tr, _ = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28))
    with pytest.raises(UsageError, match="INT8 model"):
        prune_(q, ThresholdConfig(sparsity=0.5))
    save_model(q, tmp_path / "q.pt")
    r = cli("prune", tmp_path / "q.pt", "--sparsity", "0.5", "--epochs", "0", "-o", tmp_path / "p.pt")
    assert one_line_error(r) and "INT8 model" in r.err
    with pytest.raises(UsageError, match="last stage"):
        Recipe.from_dict({"stage": [{"method": "int8"}, {"method": "quantize", "bits": 4}]})


def test_int8_outputs_are_refused_where_they_do_not_belong_before_any_work(lenet5_trained, mnist_small, cli, tmp_path):
    tr, _ = mnist_small
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "quantize", tmp_path / "m.pt", "--activations", "--calib-data", "mnist5k?limit=64", "-o", tmp_path / "q.cpz"
    )
    assert r.code == 2 and "NAME.pt" in r.err and not (tmp_path / "q.cpz").exists()
    save_model(to_int8(lenet5_trained, tr, (1, 1, 28, 28)), tmp_path / "q.pt")
    r = cli("export", tmp_path / "q.pt", "-o", tmp_path / "q.onnx")
    assert one_line_error(r) and "float model with --int8" in r.err and not (tmp_path / "q.onnx").exists()


def test_a_torch_without_the_fx_flow_gets_one_line_not_a_traceback(
    lenet5_trained, mnist_small, tmp_path, monkeypatch, cli
):
    import sys

    tr, _ = mnist_small
    save_model(to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine="fx"), tmp_path / "q.pt")
    monkeypatch.setitem(sys.modules, "torch.ao.quantization.quantize_fx", None)  # as if a later torch removed it
    with pytest.raises(UsageError, match="no FX INT8 flow"):
        to_int8(lenet5_trained, tr, (1, 1, 28, 28), engine="fx")
    r = cli("report", tmp_path / "q.pt", "--no-latency")
    assert one_line_error(r) and "export --int8" in r.err


@pytest.fixture(scope="module")
def mobilenetv3_int8():
    """pytorchcv's MobileNetV3-small (224 x 224: its last pooling is 7 x 7) and what quantize --activations
    (PT2E, min-max ranges of 8 random images) made of it; the float model given stays as it was."""
    from pytorchcv.models.mobilenetv3 import mobilenetv3_small_w7d20

    from compress.method import Context, run
    from compress.quantize.int8_stage import Int8Config

    torch.manual_seed(0)
    m = mobilenetv3_small_w7d20(num_classes=10).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calib = data_mod.TensorData(torch.rand(8, 3, 224, 224), torch.zeros(8, dtype=torch.long), "random")
    res = run("quantize", m, Int8Config(observer="minmax"), Context(train=calib))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    return m, res


def test_hand_written_hard_swish_runs_as_one_int8_op(mobilenetv3_int8):
    """pytorchcv's MobileNetV3 computes hard-swish as x * relu6(x + 3) / 6 in its own module: INT8 runs it as
    torch's Hardswish (judged by what the module computes), so no intermediate of the formula is rounded."""
    import torch.nn as nn

    from compress.quantize.int8 import native_activations

    m, res = mobilenetv3_int8
    hand = [n for n, mod in m.named_modules() if type(mod).__name__ in ("HSwish", "HSigmoid")]
    probe = copy.deepcopy(m)
    assert sorted(native_activations(probe)) == sorted(hand) and hand
    assert not any(type(mod).__name__ in ("HSwish", "HSigmoid") for mod in probe.modules())
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(probe(x), m(x), atol=1e-5)  # the same function
    assert native_activations(nn.Sequential(nn.ReLU(), nn.Dropout(), nn.Identity())) == []
    assert res.model.engine == "pt2e", res.notes
    ops = {str(n.target) for n in res.model.inner.graph.nodes}
    assert "aten.hardswish.default" in ops and any("hard-swish" in n for n in res.notes)
    assert any(type(mod).__name__ == "HSwish" for mod in m.modules())  # the float model given is left as it was


def test_a_file_made_before_the_activation_swap_rebuilds_as_it_was_made(tmp_path):
    from pytorchcv.models.mobilenetv3 import mobilenetv3_small_w7d20

    from compress.quantize import int8

    torch.manual_seed(0)
    m = mobilenetv3_small_w7d20(num_classes=10).eval()
    calib = data_mod.TensorData(torch.rand(4, 3, 224, 224), torch.zeros(4, dtype=torch.long), "random")
    prepared = int8.prepare(m, (1, 3, 224, 224), native=False)  # as compress 0.2 traced it: the formula itself
    int8.calibrate(prepared, calib)
    old = int8.convert(
        prepared,
        {
            "backend": "x86",
            "observer": "histogram",
            "input_shape": [1, 3, 224, 224],
            "calibration": "random",
            "keep_float": [],
        },
        m,
    )  # no "native_activations" key
    save_model(old, tmp_path / "old.pt")
    x = torch.rand(2, 3, 224, 224)
    spec = "pytorchcv.models.mobilenetv3:mobilenetv3_small_w7d20"
    assert torch.equal(load_model(tmp_path / "old.pt", arch=spec)(x), old(x))


def test_the_default_path_runs_pt2e_and_imports_no_fx_flow(tmp_path):
    """The default lowering is torchao's PT2E: torch.ao's FX flow (deprecated by PyTorch) is not even imported."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import compress\n"
        "from compress import data\n"
        "from compress.models import create_model\n"
        "torch.manual_seed(0)\n"
        "m = create_model('lenet5').eval()\n"
        "q = compress.lower_int8(m, compress.Int8Config(), calib_data=data.load('mnist5k?limit=64'))\n"
        "compress.save_model(q, sys.argv[1])\n"
        "again = compress.load_model(sys.argv[1])\n"
        "print(q.engine, again.engine, 'torch.ao.quantization.quantize_fx' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "q.pt")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["pt2e", "pt2e", "False"], r.stdout


def test_a_pt2e_model_compiles_once_per_shape_and_computes_what_its_graph_does(
    lenet5_trained, mnist_small, monkeypatch
):
    """Compiled by inductor on the first call at each shape (seconds kept apart from latency), the INT8 kernels
    compute what the reference graph computes, up to the rounding of their float steps."""
    from compress.quantize import pt2e

    if pt2e.compiler() is None:
        pytest.skip("no C++ compiler: PT2E models run their reference graph")
    tr, va = mnist_small
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax")
    x = va.batch(torch.arange(32))[0]
    with torch.no_grad():
        ref = q(x)  # (the test session runs the reference graph: COMPRESS_INT8_COMPILE=0)
        monkeypatch.setenv("COMPRESS_INT8_COMPILE", "1")
        out = q(x)
        assert set(q.compile_seconds) == {"32x1x28x28"} and q.runner.failed is None
        q(x[:1])
        assert set(q.compile_seconds) == {"32x1x28x28", "1x1x28x28"}
        again = q(x)
    assert torch.equal(out, again)
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= 0.97
    assert float((out - ref).norm() / ref.norm()) < 0.02


class _OneReluTwice(torch.nn.Module):
    """One ReLU module called in two places, as torchvision's BasicBlock and pytorchcv's ShuffleNetV2 call theirs."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x)) + x
        return self.fc(x.mean((2, 3)))


class _OneConvTwice(_OneReluTwice):
    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv2(self.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_module_called_in_two_places_runs_on_pt2e():
    """torchao's matcher refused a module called twice ("Input partition has more than one output node"), so
    such a model fell back to FX; each call is now a partition of its own (pt2e_patches.one_partition_per_call)."""
    from compress.quantize import pt2e
    from compress.quantize.pt2e_patches import CALL, one_partition_per_call

    if pt2e.unavailable():
        pytest.skip(pt2e.unavailable())
    torch.manual_seed(0)
    m = _OneReluTwice().eval()
    graph = pt2e.export(copy.deepcopy(m), (1, 1, 16, 16))
    assert one_partition_per_call(graph) == 1
    assert one_partition_per_call(graph) == 0  # each call is alone now; a graph torchao accepts is left as it is
    calib = data_mod.TensorData(torch.rand(64, 1, 16, 16), torch.zeros(64, dtype=torch.long), "random")
    q = to_int8(copy.deepcopy(m), calib, (1, 1, 16, 16), observer="minmax")
    assert q.engine == "pt2e", q.compress_int8.get("engine_note")
    assert sorted(_quantized_layers(q)) == ["conv1", "conv2", "fc"] and not any(CALL in n for n in _quantized_layers(q))
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert float((q(x) - m(x)).norm() / m(x).norm()) < 0.05
    twice = _OneConvTwice().eval()  # a module kept float stays float at each of its calls
    kept = to_int8(twice, calib, (1, 1, 16, 16), observer="minmax", keep_float=["conv2"])
    assert kept.engine == "pt2e" and sorted(_quantized_layers(kept)) == ["conv1", "fc"]  # float at both calls


def test_a_compiled_graph_that_computes_other_numbers_is_not_run(lenet5_trained, mnist_small, monkeypatch):
    """Inductor compiled ShuffleNetV2's INT8 graph to outputs 26-53% off its reference graph (61.8% against 74.9% on
    MNIST's test set): the first call at a shape compares the two, the reference graph runs where they differ, and
    ``auto`` then quantizes the model on the FX flow and says why. Here a compiler that doubles every output."""
    from compress.quantize import pt2e

    if pt2e.unavailable() or pt2e.compiler() is None:
        pytest.skip("PT2E or its C++ compiler is not at hand")
    monkeypatch.setenv("COMPRESS_INT8_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", lambda graph, **kw: lambda x: 2 * graph(x))
    tr, va = mnist_small
    x = va.batch(torch.arange(16))[0]
    q = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax", engine="pt2e")
    with torch.no_grad():
        ref = q.runner.graph(x)
        assert torch.equal(q(x), ref) and "differed from the reference graph's by 100.0%" in q.runner.failed
        assert torch.equal(q(x), ref)  # and from then on
    auto = to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax")
    assert auto.engine == "fx" and "differed from the reference graph's" in auto.compress_int8["engine_note"]
    monkeypatch.setattr(torch, "compile", lambda graph, **kw: graph)  # a compiler that gets it right
    assert to_int8(lenet5_trained, tr, (1, 1, 28, 28), observer="minmax").engine == "pt2e"


def test_a_convolution_read_by_its_batch_norm_and_by_others_keeps_its_own_output():
    """DenseNet's stem: a convolution read by the batch norm of the next unit and by the concatenation. Folding
    the batch norm into it (torchao folds whatever else reads it) hands the concatenation normalised features;
    compress folds it only where the batch norm is the one reader (DenseNet-40-BC PTQ: 10.36% -> 97% here)."""
    import torch.nn as nn

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(16, 4)

        def forward(self, x):
            y = self.conv(x)
            z = torch.cat([y, torch.relu(self.bn(y))], 1)
            return self.head(z.mean((2, 3)))

    torch.manual_seed(0)
    m = Stem().eval()
    with torch.no_grad():
        m.bn.running_mean.fill_(3.0)
        m.bn.running_var.fill_(0.25)
        m.bn.weight.fill_(2.0)
    x = torch.randn(64, 1, 8, 8)
    calib = data_mod.TensorData(x, torch.zeros(64, dtype=torch.long), "random")
    q = to_int8(m, calib, (1, 1, 8, 8), observer="minmax", engine="pt2e")
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert q.engine == "pt2e"
    assert float((out - ref).norm() / ref.norm()) < 0.05
