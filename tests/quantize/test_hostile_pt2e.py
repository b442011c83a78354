"""Hostile PT2E INT8 files (version 3, engine "pt2e"): lies in the table, the activation qparams, the state's
index and buffers, the graph's constants (per-channel scales and zero points included) and the architecture.
Each file goes through ``compress report`` in a child process under an address-space cap
(tests/hostile_harness.py): refused in one line by compress's own check (never "internal error"), or, where
the file only holds other numbers, loaded and run."""

import copy
import json
import math
import pickle
import sys
import threading
import types

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import data as data_mod
from compress.cpz.container import encode_model
from compress.errors import InputError
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.quantize.int8_file import INT8_KEY
from compress.quantize.int8_stage import to_int8
from tests.hostile_harness import run_cli_each

ESC = "\x1b[2J\x1b]0;pwned\x07"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One real PT2E INT8 file of an (untrained) LeNet-5, calibrated on 200 digits."""
    torch.manual_seed(0)
    q = to_int8(
        create_model("lenet5"), data_mod.load("mnist5k?limit=200"), (1, 1, 28, 28), observer="minmax", engine="pt2e"
    )
    path = tmp_path_factory.mktemp("pt2e") / "lenet5.pt"
    save_model(q, path)
    obj = torch.load(path, weights_only=True)
    assert obj[INT8_KEY]["version"] == 3 and obj[INT8_KEY]["engine"] == "pt2e"
    return path


def _save(obj, dst) -> None:
    """torch.save; where a list nests deeper than its pickler recurses (50,000 deep), Python's own pickler on a
    large stack."""
    try:
        torch.save(obj, dst)
        return
    except RecursionError:
        pass
    pure = types.SimpleNamespace(Pickler=pickle._Pickler, Unpickler=pickle._Unpickler, __name__="pickle")
    error = []

    def write():
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(10**6)
        try:
            torch.save(obj, dst, pickle_module=pure)
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)
        finally:
            sys.setrecursionlimit(limit)

    size = threading.stack_size(1 << 28)
    try:
        t = threading.Thread(target=write)
        t.start()
        t.join()
    finally:
        threading.stack_size(size)
    if error:
        raise error[0]


def _forge(src, dst, change):
    obj = torch.load(src, weights_only=True)
    change(obj)
    _save(obj, dst)
    return dst


def _deep(n: int) -> list:
    out: list = []
    inner = out
    for _ in range(n):
        inner.append([])
        inner = inner[0]
    return out


def _table(**kw):
    return lambda o: o[INT8_KEY].update(**kw)


def _row(o, name: str) -> list:
    return next(r for r in o[INT8_KEY]["index"] if r[0] == name)


def _index(name: str, column: int, value):
    return lambda o: _row(o, name).__setitem__(column, value)


def _const(name: str, *values):
    """The constant ``name`` set to ``values`` (repeated to its length), in place in its buffer."""

    def change(o):
        _, dt, shape, off = _row(o, name)
        n = math.prod(shape)
        buf = o["int8_state"][dt]
        v = torch.tensor(values, dtype=torch.float64)
        buf[off : off + n] = v.repeat(n // len(values) + 1)[:n].to(buf.dtype)

    return change


def _qparam(i: int, column: int, value):
    return lambda o: o[INT8_KEY]["qparams"][i].__setitem__(column, value)


def _state(dt: str, make):
    return lambda o: o["int8_state"].__setitem__(dt, make(o["int8_state"][dt]))


def _arch(model: nn.Module, input_shape=None):
    def change(o):
        o["compress_cpz"] = encode_model(model)[0]
        if input_shape is not None:
            o[INT8_KEY]["input_shape"] = input_shape

    return change


DAMAGED_Q = "a row of its activation ranges is damaged"
DAMAGED_I = "a row of its state index is damaged"
NOT_OURS = "its table is not one this compress writes"
FALLBACK = "its float fallback is not rows"
BUFFERS = "not buffers of the dtypes this compress writes"
SCALE = "has a scale that is not a finite positive number"
TOO_BIG = "larger than an INT8 rebuild may be"

CASES = {  # name: (change, what the one line says; None: it loads and runs)
    # the table
    "version True": (_table(version=True), NOT_OURS),
    "version 3.0": (_table(version=3.0), NOT_OURS),
    "version 2 with engine pt2e": (_table(version=2), NOT_OURS),
    "version 1 with engine pt2e": (_table(version=1), NOT_OURS),
    "engine fx with version 3": (_table(engine="fx"), NOT_OURS),
    "no engine with version 3": (lambda o: o[INT8_KEY].pop("engine"), NOT_OURS),
    "version 10^30": (_table(version=10**30), NOT_OURS),
    "reduce_range True": (_table(reduce_range=True), NOT_OURS),
    "reduce_range 2": (_table(reduce_range=2), NOT_OURS),
    # the other grid than the one the file was written on (7-bit activations without VNNI, 8-bit with it)
    "reduce_range flipped (another grid)": (
        lambda o: o[INT8_KEY].update(reduce_range=1 - o[INT8_KEY].get("reduce_range", 0)),
        "another integer grid",
    ),
    "an observer error of 10^400": (_table(observer_errors=[["minmax", 10**400]]), NOT_OURS),
    "an observer error of NaN": (_table(observer_errors=[["minmax", NAN]]), NOT_OURS),
    "a budget that is a number": (_table(budget=0.5), NOT_OURS),
    "a float fallback that is text": (_table(float_fallback="fc2"), NOT_OURS),
    "a float fallback of a layer not kept float": (
        _table(float_fallback=[["fc2", 0.1, 0.05, 90.0, 91.0]]),
        FALLBACK,
    ),
    "a float fallback error of 10^400": (
        _table(keep_float=["fc2"], float_fallback=[["fc2", 10**400, 0.05, 90.0, 91.0]]),
        FALLBACK,
    ),
    "a float fallback score of NaN": (
        _table(keep_float=["fc2"], float_fallback=[["fc2", 0.1, 0.0, NAN, 1.0]]),
        FALLBACK,
    ),
    "a float fallback error True": (
        _table(keep_float=["fc2"], float_fallback=[["fc2", True, 0.0, 1.0, 1.0]]),
        FALLBACK,
    ),
    "a layer twice in the float fallback": (
        _table(keep_float=["fc2"], float_fallback=[["fc2", 0.1, 0.0, 1.0, 1.0]] * 2),
        FALLBACK,
    ),
    "a float fallback of 100,000 rows": (
        _table(keep_float=["fc2"], float_fallback=[["fc2", 0.1, 0.0, 1.0, 1.0]] * 100_000),
        FALLBACK,
    ),
    "a float fallback nested 50,000 deep": (_table(float_fallback=_deep(50_000)), FALLBACK),
    "an unknown key nested 50,000 deep": (_table(extra=_deep(50_000)), NOT_OURS),
    "an input shape nested 50,000 deep": (_table(input_shape=_deep(50_000)), "bad input shape"),
    "activation ranges nested 50,000 deep": (_table(qparams=_deep(50_000)), DAMAGED_Q),
    "an unknown key that is a tuple": (lambda o: o[INT8_KEY].update({(1, 2): "x"}), NOT_OURS),
    "an unknown key that is an escape sequence": (lambda o: o[INT8_KEY].update({ESC: "x"}), NOT_OURS),
    "a calibration that is a number": (_table(calibration=5), NOT_OURS),
    "metadata nested 600 deep": (_table(meta='{"history": ' + "[" * 600 + "]" * 600 + "}"), "nested at most"),
    "metadata nested 100,000 deep": (_table(meta="[" * 100_000 + "]" * 100_000), "not JSON"),
    "metadata of a 5,000-digit number": (_table(meta='{"num_classes": ' + "9" * 5000 + "}"), "not JSON"),
    "metadata fields of the wrong types": (
        _table(meta=json.dumps({"history": [7, None], "arch": {"a": 1}, "num_classes": -1, "input_shape": "x"})),
        None,
    ),
    "a 65535 x 65535 input": (_table(input_shape=[1, 1, 65535, 65535]), "values per sample"),
    "an input LeNet-5 cannot take": (_table(input_shape=[1, 3, 28, 28]), "meta device"),
    "a batch of 60,000 in the input shape": (_table(input_shape=[60000, 1, 28, 28]), None),  # runs at batch 1
    "a layer kept float that has an escape sequence for a name": (_table(keep_float=[ESC]), "does not have"),
    "a layer kept float that the file's constants do not show": (_table(keep_float=["fc2"]), "do not match"),
    "the whole model kept float": (_table(keep_float=[""]), "do not match"),
    "hand-written activations the model lacks": (_table(native_activations=["conv1"]), "activations do not"),
    # activation qparams
    "an activation scale of NaN": (_qparam(2, 1, NAN), DAMAGED_Q),
    "an activation scale of inf": (_qparam(2, 1, INF), DAMAGED_Q),
    "an activation scale of 0": (_qparam(2, 1, 0.0), DAMAGED_Q),
    "an activation scale of -1": (_qparam(2, 1, -1.0), DAMAGED_Q),
    "an activation scale of 1e-300 (0 in float32)": (_qparam(2, 1, 1e-300), DAMAGED_Q),
    "an activation scale of 1e-45 (subnormal)": (_qparam(2, 1, 1e-45), DAMAGED_Q),
    "an activation scale that is an int": (_qparam(2, 1, 1), DAMAGED_Q),
    "an activation scale that is True": (_qparam(2, 1, True), DAMAGED_Q),
    "an activation zero point past its grid's top": (
        lambda o: _qparam(2, 2, o[INT8_KEY]["qparams"][2][4] + 1)(o),  # 128 for 0..127 (no VNNI), 256 for 0..255
        "scale or zero point out of range",
    ),
    "an activation zero point of 2^40": (_qparam(2, 2, 2**40), DAMAGED_Q),
    "a quant_min that lies": (_qparam(2, 3, -128), "another integer grid"),
    "a quant_max that lies": (  # the other grid's top: 255 for 0..127, 127 for 0..255
        lambda o: _qparam(2, 4, 382 - o[INT8_KEY]["qparams"][2][4])(o),
        "another integer grid",
    ),
    "an activation named twice": (lambda o: o[INT8_KEY]["qparams"].append(list(o[INT8_KEY]["qparams"][0])), DAMAGED_Q),
    "an activation the graph lacks": (
        lambda o: o[INT8_KEY]["qparams"].append(["nope", 0.1, 0, 0, 127]),
        "ranges do not match",
    ),
    "an activation missing": (lambda o: o[INT8_KEY]["qparams"].pop(), "ranges do not match"),
    "an activation row of 4": (lambda o: o[INT8_KEY]["qparams"][0].pop(), DAMAGED_Q),
    "an activation row that is a tuple": (
        lambda o: o[INT8_KEY]["qparams"].__setitem__(0, tuple(o[INT8_KEY]["qparams"][0])),
        DAMAGED_Q,
    ),
    "an activation named by a list": (_qparam(0, 0, ["a"]), DAMAGED_Q),
    "no activation ranges": (lambda o: o[INT8_KEY].pop("qparams"), NOT_OURS),
    # the index of the state
    "a row past its buffer": (_index("fc2.bias", 3, 10**6), "lies outside its buffer"),
    "a negative offset": (_index("fc2.bias", 3, -5), DAMAGED_I),
    "a shape of 8 x (2^31 - 1)": (_index("fc2.bias", 2, [2**31 - 1] * 8), "lies outside its buffer"),
    "a shape with a 0": (_index("fc2.bias", 2, [0]), "does not match its float model"),
    "a shape of 9 dimensions": (_index("fc2.bias", 2, [1] * 9), DAMAGED_I),
    "a dtype not packed": (_index("fc2.bias", 1, "float64"), DAMAGED_I),
    "a dtype that is a list": (_index("fc2.bias", 1, ["int8"]), DAMAGED_I),
    "a dtype that is a table": (_index("fc2.bias", 1, {}), DAMAGED_I),
    "a float constant read as int8": (_index("fc2.bias", 1, "int8"), "does not match its float model"),
    "a row named twice": (lambda o: o[INT8_KEY]["index"].append(list(o[INT8_KEY]["index"][0])), "listed twice"),
    "a constant missing": (lambda o: o[INT8_KEY]["index"].pop(), "constants do not match"),
    "a constant the graph lacks": (
        lambda o: o[INT8_KEY]["index"].append(["evil", "int8", [1], 0]),
        "constants do not match",
    ),
    "rows that overlap (other numbers)": (_index("conv1.bias", 3, 0), None),
    # the buffers
    "a 2-D buffer": (_state("int8", lambda b: b.view(1, -1)), BUFFERS),
    "a float64 buffer": (_state("float32", lambda b: b.double()), BUFFERS),
    "a sparse buffer": (_state("int8", lambda b: b.to_sparse()), BUFFERS),
    "a strided buffer": (_state("int8", lambda b: torch.stack([b, b], 1).reshape(-1)[::2]), BUFFERS),
    "a buffer of 10^12 values of stride 0": (_state("int8", lambda b: b[:1].expand(10**12)), BUFFERS),
    "a buffer at an offset in its storage": (
        _state("int8", lambda b: torch.cat([torch.zeros(7, dtype=b.dtype), b])[7:]),
        None,
    ),
    "a bool buffer": (lambda o: o["int8_state"].__setitem__("bool", torch.zeros(3, dtype=torch.bool)), BUFFERS),
    # the graph's constants: per-channel weight scales and zero points, integer weights, biases
    "per-channel scales of NaN": (_const("_scale_1", NAN), SCALE),
    "one per-channel scale of NaN": (_const("_scale_1", NAN, *[0.01] * 49), SCALE),
    "per-channel scales of 0": (_const("_scale_1", 0.0), SCALE),
    "per-channel scales of -1": (_const("_scale_1", -1.0), SCALE),
    "per-channel scales of inf": (_const("_scale_1", INF), SCALE),
    "per-channel scales of 1e-45": (_const("_scale_1", 1e-45), SCALE),
    "weight zero points of 2^62": (_const("_zero_point_1", 2**62), "zero point other than 0"),
    "weight zero points of 5 (the compiled kernels ignore them)": (_const("_zero_point_1", 5), "zero point other"),
    "a bias of NaN (a float model's number)": (_const("conv1.bias", NAN), None),
    # the architecture
    "an architecture of garbage": (lambda o: o.__setitem__("compress_cpz", b"garbage"), "not a valid .cpz"),
    "a ResNet-8 architecture": (_arch(create_model("resnet8"), [1, 1, 8, 8]), "constants do not match"),
    "LeNet-5 of 11 classes": (_arch(create_model("lenet5", num_classes=11)), "does not match its float model"),
    "a chain of 600 linear layers (1,201 operations)": (
        _arch(nn.Sequential(*[nn.Linear(2, 2) for _ in range(600)]), [1, 2]),
        TOO_BIG,
    ),
    "a chain of 5,000 ReLUs": (_arch(nn.Sequential(*[nn.ReLU() for _ in range(5000)]), [1, 2]), TOO_BIG),
}


@pytest.fixture(scope="module")
def ran(made, tmp_path_factory):
    """The two tests below in one capped child (torch and torchao start once): the pickle of millions of records
    first (its peak is the child's after it), then CASES."""
    d = tmp_path_factory.mktemp("forged")
    rows = [[f"n{i}", 0.1, 0, 0, 127] for i in range(220_000)]
    argvs = [["report", _forge(made, d / "rows.pt", lambda o: o[INT8_KEY].update(qparams=rows)), "--no-latency"]]
    argvs += [
        ["report", _forge(made, d / f"case{k}.pt", change), "--no-latency"]
        for k, (change, _) in enumerate(CASES.values())
    ]
    ended, _ = run_cli_each(argvs)
    return ended[0], ended[1:]


def test_hostile_pt2e_files_are_refused_in_one_line(ran):
    _, ended = ran
    for (what, (_, match)), e in zip(CASES.items(), ended, strict=True):
        if match is None:  # other numbers, or lies the reader does not act on: it loads and reports
            assert e.code == 0 and e.clean, (what, e)
        else:
            assert e.one_line_refusal and match in e.err and "internal error" not in e.err, (what, e)
        assert e.seconds < 20, (what, e)
    assert ended[-1].peak_mb < 1200, ended[-1]


def test_a_pickle_of_millions_of_records_is_refused_before_torch_unpickles_it(ran):
    """220,000 activation rows: 2.4 M pickle records, 9 MB of file, which torch's weights-only unpickler takes
    ~10 s and ~400 MB of Python objects to read (a million rows: 50 s, 1.4 GB). Counted first, refused."""
    ended, _ = ran
    assert ended.one_line_refusal and "COMPRESS_MAX_PICKLE_OPS" in ended.err, ended
    assert ended.seconds < 10, ended
    assert ended.peak_mb < 700, ended


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list) and len(obj) < 20:
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    yield path


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 70000), max_size=6),
    st.lists(st.floats(allow_nan=True), max_size=6),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_pt2e_table_with_any_field_changed_loads_or_is_refused(made, tmp_path_factory, data):
    """Any value of the table -- its qparams and index rows included -- replaced by junk: loading ends in
    compress's own InputError or a model that runs; never another exception."""
    obj = torch.load(made, weights_only=True)
    table = obj[INT8_KEY]
    path = data.draw(st.sampled_from([p for p in _leaves(table) if p]))
    parent = table
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = copy.deepcopy(data.draw(JUNK))
    f = tmp_path_factory.mktemp("fuzz") / "f.pt"
    torch.save(obj, f)
    try:
        m = load_model(f)
    except InputError:
        return
    with torch.no_grad():
        m(torch.zeros(2, 1, 28, 28))
