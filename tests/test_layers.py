"""tools/check_layers.py: every import counts (in functions, importlib with a literal name, the packages an
import initialises), a package apart from its submodules; the tree holds its layers."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / "compress" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path / "compress"


def test_the_tree_holds_its_layers(capsys):
    assert check_layers.main(["--allow-cycle", "compress.cli"]) == 0
    assert "0 violation(s)" in capsys.readouterr().out


def test_hidden_imports_count(tmp_path, capsys):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            # a leaf reaching up from inside a function: a layer violation
            "errors.py": "def f():\n    from compress.cli import app\n",
            "cli/__init__.py": "app = 1\n",
            # a cycle closed by importlib with a literal name, within one layer
            "meta.py": "import importlib\n\ndef f():\n    importlib.import_module('compress.budget')\n",
            "budget.py": "from compress import meta\n",
            # a submodule importing its package's __init__, which imports it: a cycle
            "data/__init__.py": "from compress.data.core import x\n",
            "data/core.py": "from compress.data import y\nx = 1\n",
            # importing a submodule runs its package: quantize.int8's package imports upwards
            "quantize/__init__.py": "from compress import report\n",
            "quantize/int8.py": "",
            "report.py": "",
            "scoring.py": "from compress.quantize import int8\n",
            "newthing.py": "",
        },
    )
    assert check_layers.main([str(pkg)]) == 1
    out = capsys.readouterr().out
    layer = {name: i for i, layer in enumerate(check_layers.LAYERS) for name in layer}
    assert (
        f"compress.errors -> compress.cli (line 2): layer {layer['compress.errors']} above layer "
        f"{layer['compress.cli']}"
    ) in out
    assert "cycle: compress.budget <-> compress.meta" in out
    assert "cycle: compress.data <-> compress.data.core" in out
    assert "compress.scoring -> compress.quantize.int8 (line 1)" in out
    assert "compress.scoring -> compress.quantize (line 1)" in out  # the package it initialises on the way
    assert "compress.quantize -> compress.report (line 1)" in out
    assert "compress.newthing: in no layer" in out
