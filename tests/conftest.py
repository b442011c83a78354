import os

os.environ.setdefault("COMPRESS_PROGRESS", "0")
os.environ.setdefault("COMPRESS_LATENCY_SECONDS", "0.1")  # tests check numbers, not speed (one test times)
# latency is timed on one thread: `make test` runs two test processes on two cores, and two timings of two threads
# each spin-wait for cores the other holds (a run then takes 100x longer and its warm-up lasts to its deadline)
os.environ.setdefault("COMPRESS_THREADS", "1")
# PT2E INT8 models run their reference graph (the same integers and ranges; float arithmetic between them)
# instead of compiling each model at each shape (seconds each, on a cold cache); the compiled path has tests of
# its own (tests/quantize/test_int8.py, "compiled")
os.environ.setdefault("COMPRESS_INT8_COMPILE", "0")

import signal
import subprocess

import pytest
import torch

from compress import data as data_mod
from compress.cli import main
from compress.config import FineTune
from compress.models import create_model
from compress.train import fit

# children are started by fork + exec, not vfork: late in a long test process (400+ tests: threads of torch, oneDNN
# and inductor, GBs of heap), a plain subprocess.run ended the pytest worker itself, silently (3 runs of 3 on
# 2026-12-07, in test_arch_by_path_and_by_module_name_the_same_classes and test_the_public_names_load_without_torch),
# while the hostile harness's children (preexec_fn: fork, never vfork) never did
subprocess._USE_VFORK = False  # type: ignore[attr-defined]

# one thread per test process: `make test` runs two processes (pytest-xdist), and a second OpenMP thread
# spinning beside other work on a busy 2-core machine costs more than it gives a small model
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_sigchld_handler_left_behind():
    """A DataLoader with worker processes sets a SIGCHLD handler in the test process and leaves it for the
    process's life (torch.utils.data._utils.signal_handling); a test process late in a full run then died of a
    kernel SIGSEGV (SI_KERNEL, main thread waiting in wait4 on a child a test had started: the signal frame could
    not be set up) in 3 full runs of 3 and in a one-process replay of one worker's 418 tests. The handler serves
    only the loader that set it, so each test ends with SIGCHLD's default disposition back."""
    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, err={self.err!r})"


@pytest.fixture
def cli(capsys):
    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        o, e = capsys.readouterr()
        return CliResult(code, o, e)

    return run


@pytest.fixture(scope="session")
def mnist_small():
    """2,000 of the embedded MNIST digits, split 90/10."""
    ds = data_mod.load("mnist5k?limit=2000")
    return data_mod.split(ds, 0.1, seed=0)


@pytest.fixture(scope="session")
def lenet5_trained(mnist_small):
    torch.manual_seed(0)
    tr, _ = mnist_small
    m = create_model("lenet5")
    fit(m, tr, FineTune(epochs=1, lr=2e-3, batch_size=64))
    m.compress_meta["input_shape"] = [1, 1, 28, 28]
    return m
