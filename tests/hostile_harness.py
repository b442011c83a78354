"""Run one reader on a hostile input in a child process under an address-space cap and a timeout.

The readers' promise (README, docs/format.md) is that a file is refused in one line, or runs bounded,
before it spends more than it justifies. An in-process test cannot see a bomb go off without going off
with it, so each hostile case runs here: ``python -m compress.cli ARGS`` (or a snippet of Python) in a
fresh interpreter whose address space is capped (``resource.setrlimit(RLIMIT_AS)``) and whose wall time is
limited in CPU seconds (``RLIMIT_CPU``: the work done, however busy the machine is), with a generous
wall-clock timeout only against a child that waits forever; the result says how it ended, what it printed
and how much memory it really took.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAP_MB = 1536  # address space of the child (torch and compress take ~300 MB resident of it)
CPU_S = 60  # CPU seconds (all threads) of the child: importing torch takes ~3; the attacks took minutes
TIMEOUT_S = 300.0  # wall clock, only against a child that blocks (a busy machine stretches wall time, not CPU)


@dataclass
class Ended:
    code: int | None  # None: killed at the wall-clock timeout; -24 (SIGXCPU): over CPU_S of work
    out: str
    err: str
    seconds: float  # CPU seconds (user + system, all threads): work, which a busy machine does not stretch
    peak_mb: float  # the child's peak resident memory

    @property
    def one_line_refusal(self) -> bool:
        """Non-zero exit, exactly one line on stderr that starts with ``error:``, no traceback, no control
        character printed (an escape sequence from a file would reach the user's terminal)."""
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        return (
            self.code not in (0, None)
            and len(lines) == 1
            and lines[0].startswith("error: ")
            and "Traceback" not in self.err
            and self.clean
        )

    @property
    def clean(self) -> bool:
        """No control character (other than newline and tab) in anything printed."""
        return not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) < 0xA0 for c in self.out + self.err)

    def __repr__(self):
        return (
            f"Ended(code={self.code}, {self.seconds:.1f} s, {self.peak_mb:.0f} MB, err={self.err[-600:]!r}, "
            f"out={self.out[-300:]!r})"
        )


def _limits(cap_mb: int, cpu_s: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (cap_mb << 20, cap_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))  # SIGXCPU ends it: code -24

    return apply


# The child's own peak resident memory (kB): VmHWM belongs to the address space exec made, while ru_maxrss
# keeps the forking parent's peak (a pytest worker that grew to 1.1 GB would report 1.1 GB for any child).
PEAK_KB = (
    "def _peak_kb():\n"
    "    try:\n"
    "        with open('/proc/self/status') as f:\n"
    "            return int(next(ln for ln in f if ln.startswith('VmHWM:')).split()[1])\n"
    "    except (OSError, StopIteration, ValueError):\n"
    "        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
)


def run_python(
    code: str,
    *,
    cap_mb: int = CAP_MB,
    timeout: float = TIMEOUT_S,
    cwd=None,
    env: dict | None = None,
    cpu_s: int = CPU_S,
) -> Ended:
    """``code`` run by a fresh ``python -c`` under the caps. Its peak RSS and CPU seconds are reported on
    stderr's last line by a wrapper and taken off again."""
    wrapper = (
        "import resource, sys\n"
        + PEAK_KB
        + "try:\n"
        + "".join(f"    {ln}\n" for ln in code.splitlines())
        + "finally:\n"
        "    u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "    sys.stderr.write(f'\\n@peak {_peak_kb()} {u.ru_utime + u.ru_stime}\\n')\n"
    )
    return _run([sys.executable, "-c", wrapper], cap_mb, timeout, cwd, env, cpu_s)


def run_cli(*args, cap_mb: int = CAP_MB, timeout: float = TIMEOUT_S, cwd=None, env: dict | None = None) -> Ended:
    """``compress ARGS`` in a fresh interpreter under the caps."""
    code = (
        "import sys\n"
        "from compress.cli import main\n"
        f"code = main({[str(a) for a in args]!r})\n"
        "sys.stdout.flush()\n"
        "raise SystemExit(code)\n"
    )
    return run_python(code, cap_mb=cap_mb, timeout=timeout, cwd=cwd, env=env)


def _run(cmd, cap_mb, timeout, cwd, env, cpu_s) -> Ended:
    full_env = {**os.environ, "COMPRESS_PROGRESS": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            env=full_env,
            preexec_fn=_limits(cap_mb, cpu_s),
            stdin=subprocess.DEVNULL,
            errors="replace",
        )
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code = None
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    peak, seconds, kept = 0.0, float("nan"), []
    for ln in err.split("\n"):
        if ln.startswith("@peak "):
            peak, seconds = int(ln.split()[1]) / 1024, float(ln.split()[2])
        else:
            kept.append(ln)
    err = "\n".join(kept).strip("\n")
    err = err + "\n" if err else ""
    return Ended(code, out, err, seconds, peak)


def run_cli_each(
    argvs: list, *, cap_mb: int = CAP_MB, timeout: float = TIMEOUT_S * 3, cwd=None, env: dict | None = None
) -> tuple[list[Ended], Ended]:
    """Several ``compress`` commands in one capped child (torch is imported once; CPU_S of work for each):
    each one's exit code, stdout, stderr, CPU seconds and the child's peak memory once it ended (the high-water
    mark of it and every command before it: a bound on its own peak), and the child as a whole (its peak memory:
    that of the costliest case at most, plus what the others left behind)."""
    import json

    code = (
        "import contextlib, io, json, sys, time\n"
        "from compress.cli import main\n"  # (_peak_kb: run_python's wrapper)
        f"results = []\n"
        f"for argv in {[[str(a) for a in argv] for argv in argvs]!r}:\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    t0 = time.process_time()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            rc = main(argv)\n"
        "        except BaseException as e:\n"
        "            import traceback; traceback.print_exc(file=err); rc = None\n"
        "    results.append([rc, out.getvalue(), err.getvalue(), time.process_time() - t0, _peak_kb() / 1024])\n"
        "print(json.dumps(results))\n"
    )
    whole = run_python(code, cap_mb=cap_mb, timeout=timeout, cwd=cwd, env=env, cpu_s=CPU_S * max(1, len(argvs)))
    try:
        rows = json.loads(whole.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"the child did not finish: {whole!r}") from None
    return [Ended(rc, out, err, s, peak) for rc, out, err, s, peak in rows], whole
