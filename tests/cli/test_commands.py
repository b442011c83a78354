"""What a user meets first: a terminal, the flags, the latency rows, the files written."""

import copy
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from compress.model_io import load_model, save_model
from tests.helpers import one_line_error


def _run_in_pty(args, timeout=180):
    """Run a command with a pseudo-terminal as stdout and stderr (as a user's shell does)."""
    main, sub = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_PROGRESS"}
    env["COLUMNS"] = "100"
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=sub, stderr=sub, env=env, close_fds=True)
    os.close(sub)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([main], [], [], 1.0)
        if r:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=10)
    os.close(main)
    return p.returncode, out.decode(errors="replace")


def test_training_in_a_terminal_shows_progress_with_declared_dependencies(tmp_path):
    code, out = _run_in_pty(
        [
            sys.executable,
            "-m",
            "compress.cli",
            "zoo",
            "train",
            "lenet300",
            "--train-data",
            "digits",
            "--epochs",
            "2",
            "-o",
            str(tmp_path / "m.pt"),
        ]
    )
    assert code == 0, out
    assert "Traceback" not in out and "train lenet300" in out  # the rich progress bar was drawn
    assert (tmp_path / "m.pt").exists()


def test_version_quiet_and_global_flags_anywhere(cli, tmp_path, lenet5_trained):
    from compress import __version__

    assert cli("--version").out.strip() == f"compress {__version__}"
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    res = cli("quantize", tmp_path / "m.pt", "--bits", "8", "-o", tmp_path / "q.pt", "--quiet")
    assert res.code == 0 and res.err == "" and "before / after" in res.out
    assert "weights only" in res.out and "faster" not in res.out  # rounded weights: the same FP32 compute
    res = cli("report", tmp_path / "nope.pt", "--debug")  # --debug after the command: a traceback
    assert res.code == 1 and "Traceback" in res.err
    res = cli("--device", "tpu", "report", tmp_path / "m.pt")
    assert one_line_error(res) and "tpu" in res.err
    for where in (["report", tmp_path / "m.pt", "--device", "tpu"], ["report", tmp_path / "m.pt", "--device=tpu"]):
        res = cli(*where)  # --device after the command means the same (it was "no such option")
        assert one_line_error(res) and "tpu" in res.err and "No such option" not in res.err
    assert cli("report", tmp_path / "m.pt", "--no-latency", "--device", "cpu").code == 0


def test_an_input_shape_without_its_batch_dimension_is_refused(cli, tmp_path, lenet5_trained):
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    res = cli("report", tmp_path / "m.pt", "--input-shape", "28,28", "--no-latency")  # was read as (1, 28)
    assert one_line_error(res) and "batch dimension first" in res.err


def test_an_existing_report_or_json_is_refused_before_the_work(cli, tmp_path, lenet5_trained):
    """--report DIR replaced a report silently while --json refused, and only after the work."""
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.html").write_text("mine")
    (tmp_path / "r.json").write_text("mine")
    for extra in (["--report", tmp_path / "rep"], ["--json", tmp_path / "r.json"]):
        res = cli("prune", tmp_path / "m.pt", "--sparsity", "0.5", "--epochs", "0", "-o", tmp_path / "p.pt", *extra)
        assert one_line_error(res) and "--force" in res.err and not (tmp_path / "p.pt").exists()
    assert (tmp_path / "rep" / "report.html").read_text() == "mine" and (tmp_path / "r.json").read_text() == "mine"
    res = cli(
        "prune",
        tmp_path / "m.pt",
        "--sparsity",
        "0.5",
        "--epochs",
        "0",
        "-o",
        tmp_path / "p.pt",
        "--report",
        tmp_path / "rep",
        "--force",
    )
    assert res.code == 0 and (tmp_path / "rep" / "report.html").read_text() != "mine"


def test_weight_only_quantize_of_a_pickle_without_input_shape(cli, tmp_path, lenet5_trained):
    m = copy.deepcopy(lenet5_trained)
    m.compress_meta = {}  # a user's model: nothing says what its input is
    torch.save(m, tmp_path / "user.pt")
    res = cli("quantize", tmp_path / "user.pt", "--bits", "8", "-o", tmp_path / "q.pt")
    assert res.code == 0, res.err
    assert "no input shape known" in res.err and "MACs" not in res.out
    q = load_model(tmp_path / "q.pt")
    assert len(torch.unique(q.fc1.weight[0])) <= 255


def test_files_are_written_with_the_umask_and_keep_their_mode(cli, tmp_path, lenet5_trained):
    old = os.umask(0o022)
    try:
        save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
        assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "m.pt", 0o640)
        save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt", force=True)
        assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o640  # --force keeps the file's mode
    finally:
        os.umask(old)


def test_only_regular_files_are_replaced_and_no_file_compress_did_not_write_is_deleted(tmp_path, lenet5_trained):
    from compress.errors import OutputExistsError
    from compress.filesystem import TMP_PREFIX, write_bytes

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputExistsError, match="not a regular file"):
        write_bytes(fifo, b"x", force=True)
    assert fifo.is_fifo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a file named like a temporary of a dead compress process may be the user's: it is never deleted
    theirs = [tmp_path / f"{TMP_PREFIX}{dead.pid}-abc-out.cpz", tmp_path / f"{TMP_PREFIX}\u0663\u0663\u0663-notes.txt"]
    for f in theirs:
        f.write_bytes(b"the user's")
    write_bytes(tmp_path / "new.bin", b"data")
    assert all(f.read_bytes() == b"the user's" for f in theirs) and (tmp_path / "new.bin").read_bytes() == b"data"


def test_concurrent_writers_to_one_new_name_never_both_succeed(tmp_path):
    code = (  # both wait for the go file, then write at once (a write imports no torch: milliseconds apart)
        "import os, sys, time; from compress.filesystem import write_bytes\n"
        "while not os.path.exists(sys.argv[3]):\n    time.sleep(0.001)\n"
        "try:\n    write_bytes(sys.argv[1], sys.argv[2].encode() * 100000)\nexcept Exception:\n    sys.exit(3)\n"
    )
    for i in range(3):
        target, go = tmp_path / f"out{i}.bin", tmp_path / f"go{i}"
        ps = [subprocess.Popen([sys.executable, "-c", code, str(target), tag, str(go)]) for tag in "ab"]
        time.sleep(0.3)  # both started and waiting
        go.touch()
        codes = sorted(p.wait() for p in ps)
        assert codes == [0, 3], codes  # exactly one wins; the loser is told, nothing is silently replaced


def test_a_speed_verdict_needs_its_interval():
    """ "faster" only when the paired interval says so, on given timings (issue: quantize of rounded weights printed
    "1.91x faster" on a busy machine); bench/test_bench_timing.py times a model against itself 20 times."""
    import random
    from statistics import median

    from compress.measure import speed_change, speed_ratio

    rng = random.Random(0)
    slow = [2.0 * rng.uniform(0.9, 1.1) for _ in range(60)]
    fast = [1.0 * rng.uniform(0.9, 1.1) for _ in range(60)]
    assert speed_change(2.0, 1.0, speed_ratio(slow, fast)).startswith("2.0")  # "2.0Nx faster (lo-hi)"
    assert "faster" in speed_change(2.0, 1.0, speed_ratio(slow, fast))
    assert "slower" in speed_change(1.0, 2.0, speed_ratio(fast, slow))
    bursty = [rng.choice([1.0, 5.0]) for _ in range(40)]  # a busy machine: both models hit alike per round
    paired = [x * rng.uniform(0.97, 1.03) for x in bursty]
    assert speed_change(median(bursty), median(paired), speed_ratio(bursty, paired)) == "same"
    noisy, other = [rng.uniform(0.5, 2.0) for _ in range(20)], [rng.uniform(0.5, 2.0) for _ in range(20)]
    verdict = speed_change(median(noisy), median(other), speed_ratio(noisy, other))  # no pairing left: a wide
    assert verdict.startswith("too noisy to tell") and "idle machine" in verdict  # interval says so, never "faster"


def test_every_timing_command_takes_no_latency_and_threads(cli, tmp_path, lenet5_trained, monkeypatch):
    monkeypatch.delenv("COMPRESS_THREADS", raising=False)
    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    for args in (
        ["prune", tmp_path / "m.pt", "--sparsity", "0.5", "--epochs", "0", "-o", tmp_path / "p.pt"],
        ["quantize", tmp_path / "m.pt", "--bits", "8", "-o", tmp_path / "q.pt"],
        ["factorize", tmp_path / "m.pt", "--energy", "0.9", "-o", tmp_path / "f.pt"],
        ["report", tmp_path / "m.pt"],
    ):
        res = cli(*args, "--no-latency", "--threads", "1")
        assert res.code == 0 and "latency" not in res.out, (args[0], res.err)
    import os

    from compress.measure import timing_threads

    assert os.environ["COMPRESS_THREADS"] == "1" and timing_threads() == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)


def test_report_names_the_data_of_every_accuracy(cli, tmp_path, lenet5_trained):
    """`report --data mnist5k` of a model trained on mnist5k scored all 5,000 digits as "accuracy %": it now
    says so, and adds the accuracy of the split the model held out."""
    from compress.meta import set_meta

    m = copy.deepcopy(lenet5_trained)
    set_meta(m, train_data="mnist5k?limit=300", val_fraction=0.2)
    save_model(m, tmp_path / "m.pt")
    res = cli(
        "report",
        tmp_path / "m.pt",
        "--data",
        "mnist5k?limit=300",
        "--test-data",
        "digits?size=28&limit=50",
        "--no-latency",
    )
    text = " ".join(res.out.split())
    assert res.code == 0 and "including the ones it was trained on" in text
    assert "held out in training" in text
    assert "test accuracy % (digits?size=28&limit=50, 50 samples)" in text


def test_version_and_help_start_without_torch():
    """`compress --version` took 6-8 s on a busy machine: it imported torch. Measured by what is imported,
    not by the clock. (`compress prune --help` imports the pruning configs, whose fields make its options.)"""
    import subprocess
    import sys

    for args in (["--version"], ["--help"], ["report", "--help"], ["zoo", "--help"]):
        code = (
            f"import sys; from compress.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 0, (args, res.stderr[-500:])


def test_an_unexpected_error_is_one_line_and_debug_shows_where(cli, tmp_path, lenet5_trained, monkeypatch):
    """Whatever a model read from a file makes torch raise (a kernel's RuntimeError, a MemoryError), the user
    gets one line; --debug gives the traceback."""
    import compress.counting

    save_model(copy.deepcopy(lenet5_trained), tmp_path / "m.pt")
    for exc in (RuntimeError("a kernel\x1b[2J failed"), MemoryError()):

        def boom(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(compress.counting, "count_macs", boom)
        res = cli("report", tmp_path / "m.pt", "--no-latency")
        assert one_line_error(res) and "\x1b" not in res.err, res
        res = cli("report", tmp_path / "m.pt", "--no-latency", "--debug")
        assert res.code == 1 and "Traceback" in res.err
