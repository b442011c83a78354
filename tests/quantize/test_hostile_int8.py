"""Hostile INT8 model files: every field of the table is checked before it is used, the input shape goes
through the shape budget and the cost of that shape is counted on the meta device before it runs, each batch
that runs is checked again, qparams are finite and in range, strings are printed escaped, and a file whose
float architecture is a graph alone is refused in one line. Each command runs in a child process under an
address-space cap (tests/hostile_harness.py)."""

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress import data as data_mod
from compress.config import FineTune
from compress.errors import InputError
from compress.model_io import load_model, save_model
from compress.models import create_model
from compress.quantize.int8_file import INT8_KEY
from compress.quantize.int8_stage import to_int8
from compress.train import fit
from tests.hostile_harness import run_cli_each

ESC = "\x1b[2J\x1b]0;pwned\x07"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two real INT8 files of the FX engine (version 2; the PT2E file's own attacks: test_hostile_pt2e.py):
    LeNet-300 (8x8 only) and a ResNet-8 (adaptive pooling: it runs at any size)."""
    d = tmp_path_factory.mktemp("int8")
    ds = data_mod.load("digits")
    torch.manual_seed(0)
    files = {}
    for name in ("lenet300", "resnet8"):
        m = create_model(name, input_size=8) if name == "lenet300" else create_model(name)
        fit(m, ds, FineTune(epochs=0.2, lr=1e-3, batch_size=64))
        q = to_int8(m, ds, (1, 1, 8, 8), observer="minmax", engine="fx")
        save_model(q, d / f"{name}.pt")
        files[name] = d / f"{name}.pt"
    return d, files


def _forge(src, dst, change):
    obj = torch.load(src, weights_only=True)
    change(obj)
    torch.save(obj, dst)
    return dst


def _rows(obj, suffix):
    return [r for r in obj[INT8_KEY]["index"] if r[0].endswith(suffix)]


def _set_row(obj, suffix, value, dtype=None):
    """Every ``suffix`` entry (``#scales``, ``#zero_points``) set to ``value``, in a buffer of ``dtype``."""
    for r in _rows(obj, suffix):
        dt = dtype or r[1]
        n = 1
        for s in r[2]:
            n *= s
        buf = obj["int8_state"].get(dt)
        extra = torch.full((n,), value, dtype=getattr(torch, dt))
        obj["int8_state"][dt] = extra if buf is None else torch.cat([buf, extra])
        r[1], r[3] = dt, len(obj["int8_state"][dt]) - n


def _graph_only_arch(obj):
    """The float architecture replaced by a .cpz that holds only a stored graph (no layers to rebuild)."""
    from compress.cpz.container import encode_model
    from compress.graph.capture import capture
    from compress.graph.model import rebuild

    m = create_model("resnet8").eval()
    gm = rebuild(capture(m, (1, 1, 8, 8)), dict(m.state_dict()))
    obj["compress_cpz"] = encode_model(gm)[0]


CASES = {  # name: (file, change, what the one line says)
    "a 28000 x 28000 input": (
        "lenet300",
        lambda o: o[INT8_KEY].update(input_shape=[1, 1, 28000, 28000]),
        "values per sample",
    ),
    "a 65535 x 65535 input": (
        "resnet8",
        lambda o: o[INT8_KEY].update(input_shape=[1, 1, 65535, 65535]),
        "values per sample",
    ),
    "a 4000 x 4000 input (16 M values, GBs of activations)": (
        "resnet8",
        lambda o: o[INT8_KEY].update(input_shape=[1, 1, 4000, 4000]),
        "MiB of activations",
    ),
    "a shape of floats and booleans": (
        "resnet8",
        lambda o: o[INT8_KEY].update(input_shape=[1, True, 8.0, 8]),
        "bad input shape",
    ),
    "a shape LeNet-300 cannot take": (
        "lenet300",
        lambda o: o[INT8_KEY].update(input_shape=[1, 1, 300, 300]),
        "meta device",
    ),
    "NaN scales": ("resnet8", lambda o: _set_row(o, "#scales", float("nan")), "finite positive"),
    "zero scales": ("resnet8", lambda o: _set_row(o, "#scales", 0.0), "finite positive"),
    "negative scales": ("resnet8", lambda o: _set_row(o, "#scales", -1.0), "finite positive"),
    "zero points of 2^62": ("resnet8", lambda o: _set_row(o, "#zero_points", 2**62, "int64"), "zero point"),
    "zero points of 300 for uint8": ("resnet8", lambda o: _set_row(o, "#zero_points", 300), "zero point"),
    "a float architecture of a graph alone": ("resnet8", _graph_only_arch, "graph only"),
    "a huge input shape in the metadata instead of the table": (
        "resnet8",
        lambda o: o[INT8_KEY].update(
            meta=json.dumps({**json.loads(o[INT8_KEY]["meta"]), "input_shape": [1, 1, 1024, 1024]})
        ),
        None,
    ),
    "a 1 MB string": ("resnet8", lambda o: o[INT8_KEY].update(calibration="x" * 1_000_000), "longer than"),
    "a layer kept float that has an escape sequence for a name": (
        "resnet8",
        lambda o: o[INT8_KEY].update(keep_float=[ESC]),
        "does not have",
    ),
}


@pytest.fixture(scope="module")
def ran(made, tmp_path_factory):
    """The three tests below in one capped child (torch, the FX flow and the MAC counter's tracer start once):
    CASES, then the escaped strings, then the large batch; each command's peak is the child's once it ended."""
    _, files = made
    d = tmp_path_factory.mktemp("forged")
    argvs = []
    for k, (src, change, _) in enumerate(CASES.values()):
        argvs.append(["report", _forge(files[src], d / f"case{k}.pt", change), "--no-latency"])
    esc = _forge(files["resnet8"], d / "esc.pt", lambda o: o[INT8_KEY].update(calibration=ESC, observer="minmax"))
    argvs.append(["report", esc, "--no-latency"])
    big = _forge(files["resnet8"], d / "big.pt", lambda o: o[INT8_KEY].update(input_shape=[1, 1, 1024, 1024]))
    argvs.append(["report", big])
    ended, _ = run_cli_each(argvs)
    return ended[: len(CASES)], ended[-2], ended[-1]


def test_hostile_int8_files_are_refused_in_one_line(ran):
    ended, _, _ = ran
    for (what, (_, _, match)), e in zip(CASES.items(), ended, strict=True):
        if match is None:  # runs, bounded: at the table's checked shape
            assert e.code == 0 and e.clean and e.seconds < 20, (what, e)
            continue
        assert e.one_line_refusal and match in e.err, (what, e)
        assert e.seconds < 20, (what, e)
    assert ended[-1].peak_mb < 1200, ended[-1]  # no case allocated what its file asked for


def test_the_batch_that_runs_is_checked_before_it_runs(ran):
    """A 1024 x 1024 input fits one sample (about 0.4 GB of activations a sample) but not the batch of 32 a
    latency run takes: the file loads and reports, and the batch run is refused in one line."""
    _, _, ended = ran
    assert ended.one_line_refusal and "a batch of 32" in ended.err, ended
    assert ended.peak_mb < 1500, ended


def test_strings_of_the_table_are_printed_escaped(ran):
    _, ended, _ = ran
    assert ended.code == 0 and ended.clean, ended
    assert "\\x1b[2J" in ended.out  # shown, escaped


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
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 70000), max_size=6),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_table_with_any_field_changed_loads_or_is_refused(made, tmp_path_factory, data):
    """Any value anywhere in the INT8 table (its shape, strings, lists, the index) replaced by junk: loading
    ends in compress's own InputError or a model that runs; never another exception."""
    _, files = made
    obj = torch.load(files["resnet8"], weights_only=True)
    table = obj[INT8_KEY]
    path = data.draw(st.sampled_from([p for p in _leaves(table) if p]))
    value = data.draw(JUNK)
    parent = table
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = copy.deepcopy(value)
    f = tmp_path_factory.mktemp("fuzz") / "f.pt"
    torch.save(obj, f)
    try:
        m = load_model(f)
    except InputError:
        return
    with torch.no_grad():
        m(torch.zeros(2, 1, 8, 8))
