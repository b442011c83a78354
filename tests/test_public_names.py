"""compress's public names: one map (``compress._EXPORTS``) that ``__all__`` is made from, every name resolving to
what its module defines, and the docs using no name outside it."""

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import compress

ROOT = Path(__file__).resolve().parents[1]


def test_all_is_the_export_map_and_every_name_resolves():
    names = [n for group in compress._EXPORTS.values() for n in group]
    assert len(names) == len(set(names)), "a name exported from two modules"
    assert compress.__all__ == sorted([*names, "data"])
    for module, group in compress._EXPORTS.items():
        for name in group:
            value = getattr(compress, name)
            assert value is getattr(importlib.import_module(f"compress.{module}"), name), name
            assert getattr(value, "__module__", "").startswith(f"compress.{module}"), (name, value.__module__)
    assert compress.data is importlib.import_module("compress.data")


def test_the_public_names_load_without_torch():
    """``compress --help`` and ``--version`` start without torch: the map is read, nothing it names is imported."""
    code = "import sys\nimport compress\nassert compress.__all__ and 'torch' not in sys.modules\nprint(dir(compress))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    assert all(repr(n) in out.stdout for n in compress.__all__)  # dir() offers the lazy names too


def _references(text: str):
    """(name, how) for each compress name a text uses: ``compress.NAME`` and ``from compress import A, B``."""
    for m in re.finditer(r"(?<![\w/.-])compress\.([A-Za-z_]\w*)", text):
        yield m.group(1), "attribute or module"
    for m in re.finditer(r"^\s*from compress import (?:\(([^)]*)\)|([\w ,]+)$)", text, re.M):
        for n in (m.group(1) or m.group(2)).replace("\n", " ").split(","):
            if n.strip():
                yield n.strip().split(" as ")[0], "from compress import"


def test_the_docs_use_only_public_names_and_modules_that_exist():
    """docs/ (its pages and examples) names ``compress.X`` only for a public name or a module of the package."""
    modules = {m.name for m in pkgutil.iter_modules(compress.__path__)}
    bad = []
    for path in sorted([*(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.py")]):
        for name, how in _references(path.read_text()):
            ok = (
                name in compress.__all__ or name == "__version__" or (how != "from compress import" and name in modules)
            )
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}: {name} ({how})")
    assert not bad, bad
