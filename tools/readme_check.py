"""Run every command of the README's command-line tour, as written and in order, in a fresh folder.

    python tools/readme_check.py            # from the repository root, after `make install`

Exits non-zero at the first command that fails, printing it. The commands use the relative paths
the README shows; the folder starts empty, as a new user's would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(readme: Path) -> list[str]:
    """Every shell line after '## The command line' (comments stripped), then each Python block,
    in the order the README shows them. The set-up block (`make demo`, `make test`) comes before."""
    text = readme.read_text()
    text = text[text.index("## The command line") :]
    out = []
    for lang, block in re.findall(r"```(sh|python)\n(.*?)```", text, re.S):
        if lang == "python":
            out.append("python - <<'PY'\n" + block + "PY")
            continue
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def main() -> int:
    venv_bin = ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "COMPRESS_PROGRESS": "0"}
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / ".venv").symlink_to(ROOT / ".venv")  # `source .venv/bin/activate` as in a clone
        for cmd in commands(ROOT / "README.md"):
            t0 = time.perf_counter()
            shell = f"set -e; source .venv/bin/activate; {cmd}"
            res = subprocess.run(["bash", "-c", shell], cwd=work, env=env, capture_output=True, text=True)
            took = time.perf_counter() - t0
            if res.returncode != 0:
                print(f"FAILED ({res.returncode}) after {took:.0f}s: {cmd}\n{res.stderr[-2000:]}", file=sys.stderr)
                return 1
            print(f"ok {took:6.1f}s  {cmd.splitlines()[0][:110]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
