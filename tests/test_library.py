"""The library is a first-class interface: its errors name keyword arguments (the CLI's name flags),
``save_model`` writes a .cpz as ``compress encode`` does, and the input shape given to a command travels
in every file it writes. The model is the user's own (a tiny residual CNN of this module) at 3x20x20."""

import warnings

import pytest
import torch
import torch.nn as nn

import compress
from compress import CompressWarning
from compress.errors import InputError, OutputExistsError, UntrustedPickleError, UsageError
from compress.graph.model import GraphModel
from compress.meta import read_meta, set_meta
from compress.method import Context
from tests.helpers import one_line_error

ARCH = "tests.test_library:tiny_res"
SHAPE = (1, 3, 20, 20)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class TinyRes(nn.Module):
    """A residual CNN of the user's own classes (neither torch.nn nor compress ones)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):  # (N, 3, 20, 20) -> (N, 4)
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def tiny_res():
    torch.manual_seed(0)
    return TinyRes()


def tiny_data():
    """64 samples of 3x20x20 in 4 classes (``--train-data tests.test_library:tiny_data``)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 20, 20, generator=g), torch.randint(0, 4, (64,), generator=g)


@pytest.fixture
def sd(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_res().state_dict(), path)
    return path


# ----------------------------------------------------------------------------- messages: keywords vs flags
def _no_graph_cpz(tmp_path):
    path = tmp_path / "nograph.cpz"
    if not path.exists():
        with pytest.warns(CompressWarning):
            compress.save_model(tiny_res(), path)
    return path


def _whole_pickle(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_res(), path)
    return path


# (what the library is given, the exception, its keyword; the same file through the CLI, its flag)
CASES = {
    "a state_dict without arch": (
        lambda t, sd: compress.load_model(sd),
        UsageError,
        "arch='module:callable'",
        lambda t, sd: ["report", sd],
        "--arch module:callable",
    ),
    "a pickle of the user's classes": (
        lambda t, sd: compress.load_model(_whole_pickle(t)),
        UntrustedPickleError,
        "trust_pickle=True",
        lambda t, sd: ["report", _whole_pickle(t)],
        "--trust-pickle",
    ),
    "a .cpz of the user's classes without its graph": (
        lambda t, sd: compress.load_model(_no_graph_cpz(t)),
        InputError,
        "arch='module:callable'",
        lambda t, sd: ["decode", _no_graph_cpz(t), "-o", t / "d.pt"],
        "--arch module:callable",
    ),
    "an existing output": (
        lambda t, sd: compress.save_model(tiny_res(), sd),
        OutputExistsError,
        "force=True",
        lambda t, sd: ["encode", sd, "--arch", ARCH, "-o", sd],
        "--force",
    ),
    "an arch that is not module:callable": (
        lambda t, sd: compress.load_model(sd, arch="nocolon"),
        UsageError,
        "arch='nocolon'",
        lambda t, sd: ["report", sd, "--arch", "nocolon"],
        "--arch nocolon",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_errors_name_keywords_for_the_library_and_flags_for_the_cli(case, tmp_path, sd, cli):
    call, exc, keyword, argv, flag = CASES[case]
    with pytest.raises(exc) as e:
        call(tmp_path, sd)
    assert keyword in str(e.value) and "--" not in str(e.value), str(e.value)
    res = cli(*argv(tmp_path, sd))
    assert one_line_error(res) and flag in res.err and "=True" not in res.err and "arch=" not in res.err, res.err


def test_the_input_shape_is_asked_for_as_a_keyword():
    with pytest.raises(UsageError, match=r"input_shape=\(1, 1, 28, 28\)") as e:
        Context().shape(tiny_res())
    assert "--" not in str(e.value)


# ----------------------------------------------------------------------------- save_model(".cpz")
def test_save_model_cpz_stores_the_graph_at_the_given_input_shape(tmp_path):
    model = tiny_res().eval()
    compress.save_model(model, tmp_path / "m.cpz", input_shape=SHAPE)
    back = compress.load_model(tmp_path / "m.cpz")  # no arch: the graph runs the user's model
    x = torch.randn(2, *SHAPE[1:])
    assert isinstance(back, GraphModel) and torch.allclose(back(x), model(x), atol=1e-6)
    assert read_meta(back).input_shape == list(SHAPE)
    assert read_meta(compress.load_model(tmp_path / "m.cpz", arch=ARCH)).input_shape == list(SHAPE)


def test_save_model_cpz_takes_the_shape_from_the_models_metadata(tmp_path):
    model = tiny_res()
    set_meta(model, input_shape=list(SHAPE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the graph is stored
        compress.save_model(model, tmp_path / "m.cpz")
    assert isinstance(compress.load_model(tmp_path / "m.cpz"), GraphModel)


def test_save_model_cpz_warns_when_it_stores_no_graph(tmp_path):
    with pytest.warns(
        CompressWarning,
        match=r"no graph stored \(its input shape is unknown "
        r"\(give input_shape=\(1, C, H, W\)\)\).*arch='module:callable'",
    ):
        compress.save_model(tiny_res(), tmp_path / "m.cpz")
    assert isinstance(compress.load_model(tmp_path / "m.cpz", arch=ARCH), TinyRes)


def test_save_model_cpz_writes_what_compress_encode_writes(tmp_path, sd, cli):
    assert cli("-q", "encode", sd, "--arch", ARCH, "--input-shape", "1,3,20,20", "-o", tmp_path / "cli.cpz").code == 0
    compress.save_model(compress.load_model(sd, arch=ARCH), tmp_path / "lib.cpz", input_shape=SHAPE)
    assert (tmp_path / "lib.cpz").read_bytes() == (tmp_path / "cli.cpz").read_bytes()


def test_the_cli_shows_the_librarys_warning_as_a_note(tmp_path, cli):
    res = cli("decode", _no_graph_cpz(tmp_path), "--arch", ARCH, "-o", tmp_path / "again.cpz")
    assert res.code == 0 and "note: " in res.err and "give --input-shape 1,C,H,W" in res.err, res.err
    assert "Warning" not in res.err and "input_shape=" not in res.err


# ----------------------------------------------------------------------------- the input shape travels
COMMANDS = {
    "prune": ["prune", "--method", "threshold", "--sparsity", "0.5", "--epochs", "0", "--no-latency"],
    "quantize": ["quantize", "--bits", "4", "--no-latency"],
    "factorize": ["factorize", "--rank-ratio", "0.5", "--no-latency"],
    "encode": ["encode", "--no-graph"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_input_shape_given_to_a_command_travels_in_its_file(command, tmp_path, sd, cli):
    argv = COMMANDS[command]
    out = tmp_path / ("out.cpz" if command == "encode" else "out.pt")
    res = cli("-q", argv[0], sd, *argv[1:], "--arch", ARCH, "--input-shape", "1,3,20,20", "-o", out)
    assert res.code == 0, res.err
    assert read_meta(compress.load_model(out, arch=ARCH)).input_shape == list(SHAPE)
    # the next command reads it: encode stores the graph without being told the shape again
    res = cli("encode", out, "--arch", ARCH, "-o", tmp_path / "next.cpz")
    assert res.code == 0 and "no graph stored" not in res.err, res.err
    assert isinstance(compress.load_model(tmp_path / "next.cpz"), GraphModel)


def test_the_input_shape_travels_through_a_pipeline_and_an_int8_file(tmp_path, sd, cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text('version = 2\n[[stage]]\nmethod = "threshold"\nsparsity = [0.5]\nfinetune = { epochs = 0 }\n')
    data = "tests.test_library:tiny_data"
    res = cli(
        "-q",
        "pipeline",
        sd,
        "--arch",
        ARCH,
        "--input-shape",
        "1,3,20,20",
        "--train-data",
        data,
        "--recipe",
        recipe,
        "--max-accuracy-drop",
        "100",
        "--no-latency",
        "-o",
        tmp_path / "p.pt",
    )
    assert res.code == 0, res.err
    assert read_meta(compress.load_model(tmp_path / "p.pt", arch=ARCH)).input_shape == list(SHAPE)
    res = cli(
        "-q",
        "quantize",
        tmp_path / "p.pt",
        "--activations",
        "--calib-data",
        data,
        "--arch",
        ARCH,
        "--no-latency",
        "-o",
        tmp_path / "q8.pt",
    )
    assert res.code == 0, res.err
    assert read_meta(compress.load_model(tmp_path / "q8.pt", arch=ARCH)).input_shape == list(SHAPE)
