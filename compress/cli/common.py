"""What every command uses: the output consoles, tables, JSON, and turning option text into values.

Results go to stdout (a table, or JSON); progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compress.errors import CompressError, UsageError, printable

state: dict = {"device": "cpu"}  # set by the root callback (--device)
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,1,28,28' (or 1x1x28x28) -> (1, 1, 28, 28); the batch dimension is always 1."""
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError as e:
        raise UsageError(f"--input-shape {text!r} must look like 1,1,28,28") from e
    if shape and shape[0] != 1:  # 28,28 would otherwise read as a batch of 28 samples of 28 values
        raise UsageError(f"--input-shape {text!r}: give the batch dimension first, 1,C,H,W (e.g. 1,1,28,28)")
    from compress.method import check_shape

    try:
        return check_shape(shape, "--input-shape")
    except CompressError as e:
        raise UsageError(str(e)) from None


def load_options(arch: str | None, trust_pickle: bool, input_shape: str | None):
    """The command's ``LoadOptions`` from its --arch, --trust-pickle and --input-shape."""
    from compress.model_io import LoadOptions

    return LoadOptions(arch, trust_pickle, parse_shape(input_shape))


def with_settings(cfg, settings: list[str] | None):
    """``cfg`` with ``key=value`` settings applied (``part.key`` inside select / finetune); values are read as
    TOML (a number, a string, a list), else taken as a plain string. A bad key or value is a usage error."""
    if not settings:
        return cfg
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the same parser, published as tomli before it joined the standard library
        import tomli as tomllib

    from compress.config import Config

    d = cfg.to_dict()
    for item in settings:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--set {item!r}: give key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        except (RecursionError, ValueError) as e:  # nested deeper than the parser recurses; an int of 5,000 digits
            raise UsageError(f"--set {key}: the value is not one compress reads ({type(e).__name__})") from None
        part, dot, sub = key.partition(".")
        if dot:
            if not isinstance(d.get(part), dict):
                raise UsageError(f"--set {key}: {part!r} is not a part of {type(cfg).__name__} (select, finetune)")
            d[part] = {**d[part], sub: value}
        else:
            d[key] = value
    return make_config(Config.from_dict, d)


def make_config(build, *args, **kw):
    """Build a config (or a part of one); its ValueError becomes a usage error naming the option."""
    try:
        return build(*args, **kw)
    except ValueError as e:
        raise UsageError(str(e)) from e


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    from rich.markup import escape  # names like "mnist5k[val]" are text, not markup; printable: a name from a

    # file never carries a control sequence to the terminal
    t = Table(title=escape(printable(title)), title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(escape(printable(c)), justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[escape(printable(fmt(v))) for v in r])
    return t


def before_after(before: dict, after: dict, title: str = "before / after") -> Table:
    """The table every model-changing command prints."""
    from compress.report.render import before_after_rows

    return table(title, ["", "before", "after", "change"], before_after_rows(before, after))


def use_threads(threads: int | None) -> None:
    """--threads: for the work and for latency timing alike (``metrics.timing_threads``)."""
    if threads:
        import os

        import torch

        torch.set_num_threads(threads)
        os.environ["COMPRESS_THREADS"] = str(threads)


def note_no_graph(why: str | None) -> None:
    """Say why a .cpz of the user's classes holds no graph (it then decodes only with their --arch)."""
    if why:
        err.print(f"note: no graph stored ({why}); decoding needs your --arch")


def check_reports(report_dir: str | None, json_out: str | None, force: bool) -> None:
    """Refuse, before any work, to replace an existing --report folder's report or --json file without --force."""
    from compress.errors import OutputExistsError

    if report_dir:
        from compress.report.render import check_folder

        check_folder(report_dir, force)
    if json_out and json_out != "-" and not force and Path(json_out).exists():
        raise OutputExistsError(f"{json_out} exists; pass --force to overwrite it")


def emit_json(obj: Any, dest: str | None, force: bool = False) -> None:
    from compress.filesystem import write_text

    text = json.dumps(obj, indent=2, default=_json_default)
    if dest == "-":
        out.print(text, markup=False)
    elif dest:
        write_text(Path(dest), text + "\n", force=force)
        err.print(f"wrote {dest}")


def _json_default(o):
    import numpy as np
    import torch

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)
