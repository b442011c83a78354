"""The report of a model decoded from its stored graph (a .cpz of the user's own classes, read without their
code) shows the graph: a row per group of nodes, each with its op kinds, MACs, parameters and output shape,
and MACs that sum to the model's total."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from compress.cpz.container import encode_model
from compress.measure import layer_table
from compress.meta import set_meta
from compress.models import create_model
from compress.report.render import render_model_report

SHAPE = [1, 3, 16, 16]


class Block(nn.Module):
    """A residual block: conv-bn-relu, conv-bn, the input added, relu."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class TinyRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, stride=2, padding=1), Block(8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(self.block(torch.relu(self.stem(x)))).flatten(1))


@pytest.fixture(scope="module")
def graph_cpz(tmp_path_factory):
    """A .cpz of TinyRes with its graph, some weights pruned to zero; and the model itself."""
    torch.manual_seed(0)
    m = TinyRes().eval()
    with torch.no_grad():
        m.block.conv1.weight[:4] = 0
    set_meta(m, input_shape=SHAPE)
    blob, stats = encode_model(copy.deepcopy(m), graph=True)
    assert stats["graph_bytes"] > 0
    path = tmp_path_factory.mktemp("g") / "tiny.cpz"
    path.write_bytes(blob)
    return path, m


def test_a_graph_only_report_shows_its_nodes_with_macs_that_sum_to_the_total(graph_cpz, cli):
    path, m = graph_cpz
    res = cli("report", path, "--no-latency", "--json", "-")  # no --arch: decoded from the stored graph
    assert res.code == 0, res.err
    rep = json.loads(res.out)
    rows = rep["layers"]
    assert all(r["type"] != "Module" for r in rows)
    assert sum(r["macs"] for r in rows) == rep["macs"] > 0
    assert sum(r["params"] for r in rows) == rep["params"]
    assert sum(r["nonzeros"] for r in rows) == rep["nonzero_params"]
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ["stem", "block.conv1", "block.conv2", "fc"]
    assert by_name["stem"]["type"] == "conv2d+relu"
    assert by_name["block.conv1"]["type"] == "conv2d+batch_norm+relu"
    assert by_name["block.conv2"]["type"] == "conv2d+batch_norm+add+relu+adaptive_avg_pool2d+view"
    assert by_name["fc"]["type"] == "linear"
    assert by_name["block.conv2"]["output_shape"] == [8] and by_name["fc"]["output_shape"] == [10]
    for r in layer_table(m, SHAPE):  # each conv / linear's MACs as its own layer counts them; bn's weights joined
        if r["type"] in ("Conv2d", "Linear"):
            assert by_name[r["name"]]["macs"] == r["macs"] > 0
            assert by_name[r["name"]]["output_shape"] in (r["output_shape"], [8])
    assert by_name["block.conv1"]["params"] == 8 * 8 * 9 + 2 * 8  # conv1 and bn1's weight and bias
    assert by_name["block.conv1"]["nonzeros"] == 4 * 8 * 9 + 8 + int(torch.count_nonzero(m.block.bn1.bias))


def test_the_table_and_the_report_folder_show_the_graphs_rows(graph_cpz, cli, tmp_path):
    path, _ = graph_cpz
    res = cli("report", path, "--no-latency", "--report", tmp_path / "r")
    assert res.code == 0, res.err
    assert "conv2d+batch_norm+relu" in res.out and "Module" not in res.out and "stored graph" in res.out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| block.conv1 | conv2d+batch_norm+relu |" in md and "Module" not in md
    assert "conv2d+batch_norm+relu" in (tmp_path / "r" / "report.html").read_text()


def test_a_zoo_models_layer_rows_are_still_its_modules():
    m = create_model("lenet5")
    rows = layer_table(m, (1, 1, 28, 28))
    assert [(r["name"], r["type"]) for r in rows] == [
        ("conv1", "Conv2d"),
        ("conv2", "Conv2d"),
        ("fc1", "Linear"),
        ("fc2", "Linear"),
    ]
    assert all("nodes" not in r for r in rows)
    assert rows[0]["macs"] == 20 * 24 * 24 * 25 and rows[0]["output_shape"] == [20, 24, 24]


def test_a_layer_name_cannot_break_the_markdown_table_or_reach_the_terminal(tmp_path):
    """Names are the file's: a '|' or a control character in one stays inside its cell, escaped; a '$' in
    the plot is text, not mathtext."""
    m = nn.Sequential()
    m.add_module("a|b\x1b[31m\nx$\\q$", nn.Linear(4, 2))
    from compress.measure import summarize

    rep = {"file": "f.pt", "file_bytes": 1, **summarize(m, (1, 4), latency=False)}
    render_model_report(rep, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in md.splitlines() if "a\\|b" in line)
    assert "\x1b" not in md and row.count(" | ") == 5 and "\\x1b[31m\\nx" in row
