"""Numbers that agree (issue 36): a verdict and the figures beside it come from the same statistic, a figure
lies within its own range, a busy machine is said to be one, every score is named by its metric, and every byte
count is the bytes written. Timings here come from a fake clock: no assertion depends on this machine's speed."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from compress import measure
from compress.report.render import before_after_rows, model_rows


class FakeMachine:
    """A clock that advances only when a fake model runs: each model's ``durations(i)`` gives the ms of its
    ``i``-th timed run; the first ``warm`` runs (the warm-up) all take ``durations(0)``."""

    def __init__(self, monkeypatch, warm: int = 10):
        self.now, self.warm = 0.0, warm
        monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: self.now))
        monkeypatch.setenv("COMPRESS_LATENCY_SECONDS", "1.5")  # of fake time

    def model(self, durations):
        calls = [0]

        def run(x):
            i = max(0, calls[0] - self.warm)
            calls[0] += 1
            self.now += durations(i) / 1000

        return run


def test_faster_is_never_printed_beside_a_larger_after(monkeypatch):
    """The user's `latency, batch 1 (ms) | 0.87 | 1.15 | 1.48x faster (1.40-1.63)`: the figures were each model's
    best block of 25 runs, the verdict the median of the per-round ratios. Rounds 0-24 the machine favoured the
    first model (0.87 vs 2.0 ms), rounds 25-99 the second (1.7 vs 1.15 ms)."""
    fake = FakeMachine(monkeypatch)
    before = fake.model(lambda i: 0.87 if 0 < i < 25 else 1.7)
    after = fake.model(lambda i: 2.0 if 0 < i < 25 else 1.15)
    t = measure.paired_speed(before, after, (1, 1, 8, 8), batch=1, runs=100)
    lo, ratio, hi = t["speedup"]
    assert lo <= ratio <= hi
    assert ratio == pytest.approx(t["before_ms"] / t["after_ms"], rel=1e-3)  # the printed ratio is the figures'
    assert "faster" in t["verdict"]
    assert t["after_ms"] < t["before_ms"], t
    assert t["verdict"].startswith(f"{t['before_ms'] / t['after_ms']:.2f}x faster")


def test_a_verdict_given_figures_it_was_not_measured_on_gives_none():
    """Old figures beside another statistic's interval: no "faster" beside a larger "after", and the 192 vs 328 ms
    that an interval around 1.0 called "same" are not called anything."""
    row = before_after_rows(
        {"latency_ms": {"batch_1": 0.87}}, {"latency_ms": {"batch_1": 1.15, "speedup": {"batch_1": [1.40, 1.48, 1.63]}}}
    )[0]
    assert row[1:3] == [0.87, 1.15] and "faster" not in row[3] and "not comparable" in row[3]
    verdict = measure.speed_change(192.0, 328.0, [0.97, 1.0, 1.03])
    assert not verdict.startswith("same") and "busy" in verdict
    assert measure.speed_change(1.0, 2.0, [0.45, 0.5, 0.55]).startswith("2.00x slower")


def test_a_summary_lies_within_its_own_range(monkeypatch):
    """`12.091 (15.010-79.032)`: the best block's median beside all runs' IQR. Now the median of the runs and
    the quartiles of the same runs."""
    fake = FakeMachine(monkeypatch)
    st = measure.latency_stats(
        [fake.model(lambda i: 12.0 if i < 25 else 15.0 + (i % 7) * 10)], (1, 1, 8, 8), batch=1, runs=100
    )[0]
    assert st["p25"] <= st["ms"] <= st["p75"], st
    assert st["runs"] >= 100
    row = model_rows(
        {
            "latency_ms": {
                "batch_1": st["ms"],
                "iqr": {"batch_1": [st["p25"], st["p75"]]},
                "runs": {"batch_1": st["runs"]},
                "spread": {"batch_1": st["spread"]},
            }
        }
    )[-1]
    assert "median" in row[0] and "IQR of the same runs" in row[0] and "best" not in row[0]


def test_a_busy_machine_is_said_to_be_one(monkeypatch):
    """Runs spread over far more than their median: every verdict and every figure from them says the machine
    looks busy and is not reliable."""
    fake = FakeMachine(monkeypatch)
    slow = [5.0, 192.0, 328.0, 40.0, 600.0]
    before, after = fake.model(lambda i: slow[i % 5]), fake.model(lambda i: slow[(i + 2) % 5])
    b, a = measure.latencies([before, after], (1, 1, 8, 8), runs=40)
    for row in before_after_rows({"latency_ms": b}, {"latency_ms": a}):
        assert "busy" in row[3] and "not reliable" in row[3], row
    for row in model_rows({"latency_ms": a}):
        assert "busy" in row[1] and "not reliable" in row[1], row
    quiet = measure.run_stats([1.0, 1.01, 0.99, 1.02, 0.98], macs=10**6)
    assert quiet["busy"] is None
    assert "busy" not in measure.speed_change(1.0, 1.0, [0.99, 1.0, 1.01], quiet["busy"])


def test_a_steadily_absurd_time_is_a_busy_machine(monkeypatch):
    """192 and 195 ms for LeNet-5 (2.3M MACs) were called "same": on a shared 2-core machine its two threads
    waited for each other, steadily (little spread). No idle CPU runs 2.3M MACs at 12M MAC/s."""
    import torch.nn as nn

    from compress import create_model

    fake = FakeMachine(monkeypatch)
    monkeypatch.setenv("COMPRESS_THREADS", "1")  # (the real runs underneath, kept short on this machine)

    class Stalled(nn.Module):  # the real model, on a machine where each call takes ``ms``
        def __init__(self, ms):
            super().__init__()
            self.net, self.ms = create_model("lenet5"), ms

        def forward(self, x):
            fake.now += self.ms / 1000
            return self.net(x)

    b, a = measure.latencies([Stalled(192.0), Stalled(195.0)], (1, 1, 28, 28), runs=5)
    assert b["spread"]["batch_1"] < 0.1 and "MAC/s" in b["busy"]["batch_1"]
    row = before_after_rows({"latency_ms": b}, {"latency_ms": a})[0]
    assert "batch 1" in row[0] and "busy" in row[3] and "not reliable" in row[3], row
    assert b["busy"]["batch_32"] is None  # 73M MACs in 192 ms: a slow CPU, not an absurd one
    assert measure.busy_reason(0.6, 0.05, 2_293_000) is None  # the same model at its idle speed


def test_speed_ratio_is_the_ratio_of_the_medians_and_repeatable():
    import random

    rng = random.Random(0)
    slow = [2.0 * rng.uniform(0.9, 1.1) for _ in range(60)]
    fast = [1.0 * rng.uniform(0.9, 1.1) for _ in range(60)]
    lo, r, hi = measure.speed_ratio(slow, fast)
    assert lo < r < hi and 1.8 < lo and hi < 2.2
    a, b = measure.run_stats(slow)["ms"], measure.run_stats(fast)["ms"]
    assert r == pytest.approx(a / b, rel=1e-3)
    assert measure.speed_ratio(slow, fast) == [lo, r, hi]  # seeded: the same runs, the same interval
    bursty = [rng.choice([1.0, 5.0]) for _ in range(40)]  # a busy machine hits both models alike, round by round
    lo, r, hi = measure.speed_ratio(bursty, [x * rng.uniform(0.97, 1.03) for x in bursty])
    assert 0.9 < lo <= r <= hi < 1.1


def test_every_score_is_named_by_its_metric(cli, tmp_path, capsys):
    """`--metric my_metric` printed "accuracy 72.22%" per round: every line, table and report names the metric."""
    import copy

    from compress import create_model
    from compress.cli.pipeline_cmd import _ShowEvents
    from compress.model_io import save_model

    (tmp_path / "mymet.py").write_text(
        "def my_metric(outputs, targets):\n    return (outputs.argmax(1) == targets).float()\n"
    )
    m = create_model("lenet5")
    m.compress_meta["input_shape"] = [1, 1, 28, 28]
    save_model(copy.deepcopy(m), tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((100, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 10, 100))
    res = cli(
        "prune",
        tmp_path / "m.pt",
        "--sparsity",
        "0.5",
        "--rounds",
        "2",
        "--epochs",
        "0",
        "--allocate",
        "std",
        "--train-data",
        tmp_path / "d.npz",
        "--metric",
        f"{tmp_path}/mymet.py:my_metric",
        "--no-latency",
        "--threads",
        "1",
        "--report",
        tmp_path / "rep",
        "-o",
        tmp_path / "p.pt",
    )
    assert res.code == 0, res
    rounds = [ln for ln in res.err.splitlines() if ln.startswith("round ")]
    assert len(rounds) == 2 and all("my_metric" in ln and "accuracy" not in ln for ln in rounds), rounds
    for name in ("report.md", "report.html"):
        text = (tmp_path / "rep" / name).read_text()
        assert "my_metric" in text and "accuracy" not in text.replace("top-1 agreement", ""), name
    show = _ShowEvents("my_metric")
    show("start", {"accuracy": 0.5, "budget": 1.0, "bytes": 100})
    show("stage", {})
    show(
        "candidate",
        {
            "stage": "prune",
            "index": 1,
            "of": 2,
            "value": 0.5,
            "accuracy": 0.45,
            "bytes": 80,
            "verdict": "kept",
            "elapsed": 3.0,
            "eta": 3.0,
            "budget_left": None,
        },
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("my_metric 0.45" in ln or "my_metric 0.5" in ln for ln in lines), lines
    assert not any("accuracy" in ln or "%" in ln.split("my_metric")[1][:8] for ln in lines), lines


def test_prune_s_cpz_bytes_are_the_bytes_encode_writes(cli, tmp_path):
    """`compress prune` said 39,276 .cpz bytes and `compress encode` wrote 39,808: the estimate left out the graph
    a model of the user's own classes is stored with, and the metadata set after it. Now encoded in memory with
    encode's options, once the model is final."""
    import json

    from compress.meta import set_meta
    from compress.model_io import save_model
    from tests.archs import tiny_cnn

    m = tiny_cnn()
    set_meta(m, input_shape=[1, 1, 8, 8], arch_ref="tests.archs:tiny_cnn")
    save_model(m, tmp_path / "w.pt")
    arch = ["--arch", "tests.archs:tiny_cnn"]
    res = cli(
        "prune",
        tmp_path / "w.pt",
        *arch,
        "--sparsity",
        "0.5",
        "--rounds",
        "1",
        "--epochs",
        "0",
        "--allocate",
        "std",
        "--no-latency",
        "--json",
        tmp_path / "o.json",
        "-o",
        tmp_path / "p.pt",
    )
    assert res.code == 0, res
    for src, out in (("p.pt", "p.cpz"), ("w.pt", "w.cpz")):
        assert cli("encode", tmp_path / src, *arch, "-o", tmp_path / out).code == 0
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["after"]["cpz_bytes"] == (tmp_path / "p.cpz").stat().st_size
    assert rep["before"]["cpz_bytes"] == (tmp_path / "w.cpz").stat().st_size


def test_pipeline_candidates_bytes_are_their_files_and_the_rest_is_said(tmp_path):
    """Pipeline candidates read 18,595 B and the file was 19,160 B: candidates were sized without the graph the
    file holds. Now with it; what is left (the pipeline's history entry, written at the end) is measured and said."""
    from compress import data as data_mod
    from compress.meta import set_meta
    from compress.model_io import save_model
    from compress.search import pipeline
    from tests.archs import tiny_cnn

    m = tiny_cnn()
    set_meta(m, arch_ref="tests.archs:tiny_cnn")
    m, s = pipeline(
        m,
        data_mod.load("digits?limit=300"),
        {"stage": [{"method": "quantize", "scheme": "kmeans", "bits": 6}]},
        max_accuracy_drop=100,
        latency=False,
    )
    save_model(m, tmp_path / "m.cpz")
    written, kept = (tmp_path / "m.cpz").stat().st_size, s.stages[0].kept.bytes
    assert s.cpz_bytes == written
    assert s.candidate_bytes_error == written - kept and abs(written - kept) < 64, (written, kept)


def test_an_int8_ir_larger_than_the_fp32_one_says_why():
    """Without OpenVINO: the note of an INT8 IR whose weights stayed FP32, or whose .xml outgrew what its INT8
    weights saved; none when it is the smaller one."""
    from compress.openvino_export import size_note

    fp32 = {"bytes": 108_797, "xml_bytes": 7_000, "bin_bytes": 101_797, "constants": {"f32": 101_700}}
    kept_fp32 = {"bytes": 118_983, "xml_bytes": 17_000, "bin_bytes": 101_983, "constants": {"f32": 101_900}}
    assert "stored in FP32" in size_note(fp32, kept_fp32)
    grown = {"bytes": 119_716, "xml_bytes": 98_348, "bin_bytes": 21_368, "constants": {"f32": 1_680, "i8": 19_464}}
    note = size_note(fp32, grown)
    assert "98,348" in note and "21,368" in note and ".xml" in note
    assert size_note(fp32, {**grown, "bytes": 60_000}) is None


def test_openvino_ir_bytes_are_both_files_and_int8_weights_are_int8(tmp_path):
    """An IR is a .xml and a .bin: its bytes are both files' as written, and an INT8 IR stores its weights as INT8
    constants (read back from the IR), with a note when its .xml makes it the larger one."""
    pytest.importorskip("openvino")
    import torch

    from compress import data as data_mod
    from compress.export import export
    from compress.models import create_model

    torch.manual_seed(0)
    m, digits = create_model("resnet8", width=0.5), data_mod.load("digits?limit=128")
    res = export(m, tmp_path / "q.xml", (1, 1, 8, 8), int8=True, calib_data=digits, fmt="openvino")["openvino"]
    q, f = res["int8"], res["fp32"]
    assert q["bytes"] == (tmp_path / "q.xml").stat().st_size + (tmp_path / "q.bin").stat().st_size
    assert q["bytes"] == q["xml_bytes"] + q["bin_bytes"]
    assert q["constants"].get("i8", 0) > 4 * q["constants"].get("f32", 0), q["constants"]  # the weights: INT8
    assert q["bin_bytes"] < f["bin_bytes"] / 3
    assert (q["size_note"] is not None) == (q["bytes"] > f["bytes"]), (q, f)


def test_counting_and_a_report_start_neither_dynamo_nor_matplotlib_and_count_what_torch_counts(tmp_path):
    """A `compress report` and MAC counts (torch's FLOP counter) in a fresh process import neither torch._dynamo (a
    second of start-up: torch's dispatch modes import it to disable themselves in a compilation nothing runs)
    nor matplotlib (only a --report draws); the counts equal those with torch._dynamo imported, on real
    architectures: residual and batch norm, squeeze-excitation, attention (the CPU attention mapping), LayerNorm."""
    import torch
    from pytorchcv.models.resnet_cifar import resnet20_cifar10

    from tests.hostile_harness import run_python

    torch.save(resnet20_cifar10().state_dict(), tmp_path / "r.pt")
    archs = {
        "pytorchcv.models.resnet_cifar:resnet20_cifar10": 32,
        "pytorchcv.models.seresnet_cifar:seresnet20_cifar10": 32,
        "tests.archs:tiny_vit": 32,
        "tests.archs:convnext_mini": 64,
    }
    code = (
        "import contextlib, io, json, sys\n"
        "import torch\n"
        "from compress.cli import main\n"
        "from compress.counting import count_macs\n"
        "from compress.model_io import arch_base\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main(['report', {str(tmp_path / 'r.pt')!r}, '--arch', {next(iter(archs))!r},"
        " '--input-shape', '1,3,32,32', '--no-latency'])\n"
        "models = {a: (arch_base(a)().eval(), (1, 3, s, s)) for a, s in " + repr(archs) + ".items()}\n"
        "counts = {a: count_macs(m, shape) for a, (m, shape) in models.items()}\n"
        "loaded = sorted(n for n in ('torch._dynamo', 'matplotlib') if n in sys.modules)\n"
        "import torch._dynamo\n"
        "print(json.dumps([rc, loaded, counts, {a: count_macs(m, shape) for a, (m, shape) in models.items()}]))\n"
    )
    e = run_python(code)
    assert e.code == 0, e
    rc, loaded, counts, with_dynamo = json.loads(e.out.strip().splitlines()[-1])
    assert rc == 0 and loaded == [], e
    assert counts == with_dynamo and all(v > 0 for v in counts.values()), (counts, with_dynamo)
    assert counts["pytorchcv.models.resnet_cifar:resnet20_cifar10"] == 40_813_184  # (ResNet-20: 41 M MACs)
