"""The user's own code, named on the command line or in a call: ``module:callable`` or
``path/to/file.py:callable`` (an architecture, a data set, a metric, a loss). Importing it runs it: only
what the user names is imported, never a name read from a file."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from compress.errors import InputError, UsageError, param

USER_PREFIX = "_compress_user_"  # the module name ``--arch path/to/mynet.py:fn`` imports ``mynet.py`` as


def resolve_callable(spec: str, what: str | None = None) -> Callable:
    """``module:callable`` or ``path/to/file.py:callable`` -> the callable. ``what`` names the option in
    messages (default: the architecture's, ``param("arch")``)."""
    if ":" not in spec:
        named = param("arch", spec) if what is None else f"{what} {spec!r}"
        raise UsageError(f"{named} must look like module:callable or path/to/file.py:callable")
    what = param("arch", spec) if what is None else what
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        p = Path(mod_name)
        if not p.is_file():
            raise InputError(f"{what}: file {p} not found")
        sp = importlib.util.spec_from_file_location(f"{USER_PREFIX}{p.stem}", p)
        if sp is None or sp.loader is None:
            raise InputError(f"{what}: {p} is not a Python module")
        module = importlib.util.module_from_spec(sp)
        try:
            sp.loader.exec_module(module)
        except SystemExit as e:  # never let a user's module end the caller's program
            raise InputError(f"{what}: importing {p} tried to exit the program (SystemExit {e.code!r})") from None
        except Exception as e:  # the user's own code failed to import
            raise InputError(f"{what}: importing {p} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise InputError(f"{what}: cannot import module {mod_name!r} ({e})") from e
        except SystemExit as e:
            raise InputError(
                f"{what}: importing {mod_name} tried to exit the program (SystemExit {e.code!r})"
            ) from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"{what}: {mod_name!r} has no callable {attr!r}")
    return fn
