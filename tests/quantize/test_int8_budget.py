"""The int8 stage under an accuracy budget: the most costly layers kept float until the INT8 model is within it.

The models are the trained LeNets with activation outliers put in by hand: one neuron of a layer scaled up and the
weights that read it scaled down by the same factor (ReLU commutes with a positive scale, so the float model
computes what it did). A per-tensor INT8 range of the next layer's input then stretches a hundredfold and every
other value of it lands on a few levels -- the outliers cross-layer equalization removes (Nagel et al., ICCV 2019)
-- and keeping the layer that reads the outlier float is what restores the accuracy.
"""

import copy

import pytest
import torch

from compress.config import FineTune
from compress.errors import InputError, UsageError
from compress.method import Context, run
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.quantize.int8 import Int8Model
from compress.quantize.int8_file import INT8_KEY
from compress.quantize.int8_stage import Int8Config, to_int8
from compress.scoring import evaluate
from compress.train import fit
from tests.helpers import one_line_error

SCALE = 100.0


def _outlier(model, pairs, scale=SCALE):
    """A copy of ``model`` computing the same function, with an outlier for each ``(layer, next, x)``: the most
    active neuron of ``layer`` (followed by a ReLU; ``x``: its inputs in ``model``) scaled up by ``scale`` and the
    weights of ``next`` that read it scaled down."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, nxt, x in pairs:
            j = int(torch.relu(model.get_submodule(name)(x)).mean(0).argmax())
            out.get_submodule(name).weight[j] *= scale
            out.get_submodule(name).bias[j] *= scale
            out.get_submodule(nxt).weight[:, j] /= scale
    return out


def _fc1_inputs(model, x):
    """LeNet-5's inputs to fc1 (the flattened features)."""
    with torch.no_grad():
        x = torch.max_pool2d(model.conv1(x), 2)
        return torch.flatten(torch.max_pool2d(model.conv2(x), 2), 1)


@pytest.fixture(scope="module")
def lenet5_outlier(lenet5_trained, mnist_small):
    """LeNet-5 with one outlier neuron in fc1: fc2's input range stretches. A thousandfold: at a hundredfold, INT8
    with 8-bit activations (AVX-512 VNNI) kept this LeNet's accuracy on the 199 validation digits (16% output error);
    only the 7-bit activations of x86 without VNNI (reduce_range) lost more than 2 pt."""
    tr, va = mnist_small
    x = _fc1_inputs(lenet5_trained, tr.batch(torch.arange(256))[0])
    m = _outlier(lenet5_trained, [("fc1", "fc2", x)], scale=10 * SCALE)
    assert abs(evaluate(m, va) - evaluate(lenet5_trained, va)) < 1.0  # the same function, in float
    return m


@pytest.fixture(scope="module")
def budgeted(lenet5_outlier, mnist_small, tmp_path_factory):
    """The outlier LeNet-5 lowered under a 0.5 pt budget (PT2E, min-max ranges), and its file."""
    tr, va = mnist_small
    cfg = Int8Config(observer="minmax", engine="pt2e", max_accuracy_drop=0.5)
    res = run("quantize", copy.deepcopy(lenet5_outlier), cfg, Context(train=tr, val=va))
    path = tmp_path_factory.mktemp("budget") / "q.pt"
    save_model(res.model, path)
    return res, path


def test_a_missed_budget_keeps_the_costly_layer_float_and_the_drop_falls(lenet5_outlier, mnist_small, budgeted):
    tr, va = mnist_small
    res, path = budgeted
    q = res.model
    base = evaluate(lenet5_outlier, va)
    plain = to_int8(lenet5_outlier, tr, (1, 1, 28, 28), observer="minmax", engine="pt2e")  # no budget
    assert plain.compress_int8["keep_float"] == [] and "budget" not in plain.compress_int8
    assert evaluate(plain, va) < base - 2  # all INT8 misses the budget
    table = q.compress_int8
    kept = table["keep_float"]
    assert 1 <= len(kept) <= 4 and "fc2" in kept  # the layer that reads the outlier
    assert evaluate(q, va) > evaluate(plain, va) + 2 and evaluate(q, va) >= base - 1.5
    assert table["budget"].startswith("within budget") and "against the float model" in table["budget"]
    rows = table["float_fallback"]
    assert [r[0] for r in rows] == [n for n in kept]  # in the order they were kept float, the costliest first
    assert all(r[2] < r[1] for r in rows)  # each lowered the output error when it alone was float
    assert rows[0][3] == pytest.approx(evaluate(plain, va), abs=0.01) and rows[-1][4] == pytest.approx(
        evaluate(q, va), abs=0.01
    )
    assert any(n.startswith("the budget kept") and "conversions" in n for n in res.notes)
    # the file reloads with the same layers float and computes the same
    again = load_model(path)
    assert isinstance(again, Int8Model) and again.compress_int8["keep_float"] == kept
    assert again.compress_int8["float_fallback"] == rows and again.compress_int8["budget"] == table["budget"]
    from compress.quantize.pt2e import int8_layers

    assert set(kept).isdisjoint(int8_layers(again.inner)) and "fc1" in int8_layers(again.inner)
    x = va.batch(torch.arange(32))[0]
    assert torch.equal(again(x), q(x))


@pytest.mark.parametrize(
    "damage",
    ["unkept", "nan", "negative", "short", "twice", "budget", "rows"],
)
def test_a_damaged_float_fallback_is_refused(budgeted, tmp_path, damage):
    _, path = budgeted
    obj = torch.load(path, weights_only=True)
    table = obj[INT8_KEY]
    row = table["float_fallback"][0]
    if damage == "unkept":  # a layer the file does not keep float
        row[0] = "conv1"
    elif damage == "nan":
        row[1] = float("nan")
    elif damage == "negative":
        row[2] = -1.0
    elif damage == "short":
        del row[4]
    elif damage == "twice":
        table["float_fallback"].append(list(row))
    elif damage == "budget":
        table["budget"] = ["within budget"]
    else:
        table["float_fallback"] = [row] * 101
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="INT8 file"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("engine", ["pt2e", "fx"])
def test_without_a_budget_or_within_it_nothing_changes(lenet5_trained, mnist_small, engine):
    tr, va = mnist_small
    ctx = Context(train=tr, val=va)
    none = run("quantize", copy.deepcopy(lenet5_trained), Int8Config(observer="minmax", engine=engine), ctx).model
    met = run(
        "quantize",
        copy.deepcopy(lenet5_trained),
        Int8Config(observer="minmax", engine=engine, max_accuracy_drop=2.0),
        ctx,
    ).model
    assert "budget" not in none.compress_int8 and "float_fallback" not in none.compress_int8
    assert met.compress_int8["budget"].startswith("within budget") and "float_fallback" not in met.compress_int8
    assert none.compress_int8["keep_float"] == met.compress_int8["keep_float"] == []
    x = va.batch(torch.arange(64))[0]
    assert torch.equal(none(x), met(x))


@pytest.fixture(scope="module")
def lenet300_outliers(mnist_small):
    """LeNet-300-100 with an outlier neuron in fc1 and one in fc2: the inputs of fc2 and fc3 stretch, so two
    layers must be kept float."""
    tr, va = mnist_small
    torch.manual_seed(0)
    m = create_model("lenet300")
    fit(m, tr, FineTune(epochs=1, lr=2e-3, batch_size=64))
    m.compress_meta["input_shape"] = [1, 1, 28, 28]
    x = torch.flatten(tr.batch(torch.arange(256))[0], 1)
    with torch.no_grad():
        h = torch.relu(m.fc1(x))
    out = _outlier(m, [("fc1", "fc2", x), ("fc2", "fc3", h)])
    assert abs(evaluate(out, va) - evaluate(m, va)) < 1.0
    return out


def test_the_limit_is_respected_and_a_miss_is_said_in_one_line(lenet300_outliers, mnist_small, cli, tmp_path):
    tr, va = mnist_small
    res = run(
        "quantize",
        copy.deepcopy(lenet300_outliers),
        Int8Config(observer="minmax", engine="pt2e", max_accuracy_drop=0.5),
        Context(train=tr, val=va),
    )
    assert sorted(res.model.compress_int8["keep_float"]) == ["fc2", "fc3"]  # both outliers' readers
    assert res.model.compress_int8["budget"].startswith("within budget")
    save_model(lenet300_outliers, tmp_path / "m.pt")
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--engine",
        "pt2e",
        "--observer",
        "minmax",
        "--max-accuracy-drop",
        "0.5",
        "--max-float-layers",
        "1",
        "--train-data",
        "mnist5k?limit=2000",
        "--no-latency",
        "-o",
        tmp_path / "q.pt",
    )
    assert r.code == 0, r.err
    missed = [ln for ln in r.err.splitlines() if "budget missed" in ln]
    assert len(missed) == 1 and missed[0].startswith("note: accuracy budget missed: over budget")
    assert "max_float_layers 1" in missed[0]
    q = load_model(tmp_path / "q.pt")  # the best model found, one layer float, is what was written
    assert len(q.compress_int8["keep_float"]) == 1 and q.compress_int8["budget"].startswith("over budget")


def test_a_budget_needs_validation_data(lenet5_trained, mnist_small, cli, tmp_path):
    tr, _ = mnist_small
    with pytest.raises(UsageError, match="validation data"):
        run("quantize", copy.deepcopy(lenet5_trained), Int8Config(max_accuracy_drop=1.0), Context(calib=tr))
    save_model(lenet5_trained, tmp_path / "m.pt")
    r = cli(
        "quantize",
        tmp_path / "m.pt",
        "--activations",
        "--max-accuracy-drop",
        "1",
        "--calib-data",
        "mnist5k?limit=64",
        "--test-data",
        "mnist5k?limit=64",
        "-o",
        tmp_path / "q.pt",
    )
    assert one_line_error(r) and "--val-data" in r.err and not (tmp_path / "q.pt").exists()
    with pytest.raises(ValueError, match="max_float_layers"):
        Int8Config(max_float_layers=101)
    r = cli("quantize", tmp_path / "m.pt", "--bits", "4", "--max-accuracy-drop", "1", "-o", tmp_path / "w.pt")
    assert r.code == 2 and "--activations" in r.err and not (tmp_path / "w.pt").exists()
    r = cli("quantize", "--help")
    assert "--max-accuracy-drop" in r.out and "--max-float-layers" in r.out


def test_the_pipelines_budget_drives_the_fallback(lenet5_outlier, mnist_small):
    from compress.search import pipeline

    tr, va = mnist_small
    recipe = {"stage": [{"method": "int8", "observer": "minmax", "engine": "pt2e"}]}
    q, summary = pipeline(copy.deepcopy(lenet5_outlier), tr, recipe, max_accuracy_drop=1.0, val_data=va, latency=False)
    kept = summary.stages[0].kept
    assert kept is not None and kept.within_budget  # the pipeline keeps what the fallback made
    assert isinstance(q, Int8Model) and "fc2" in q.compress_int8["keep_float"]
    assert "against the pipeline input" in q.compress_int8["budget"]
