"""Exceptions that the library raises and the CLI maps to one-line errors.

Every message says what is wrong and, where there is one, how to fix it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# where an INT8 model (quantize.int8.Int8Model) cannot go: said the same way by the container and the commands
INT8_IS_PT = "an INT8 model is saved as a .pt (its architecture travels inside as a .cpz)"


class CompressError(Exception):
    """Base of every error that compress raises on purpose (exit code 1)."""

    exit_code = 1


class UsageError(CompressError):
    """A bad option or combination of options (exit code 2)."""

    exit_code = 2


class InputError(CompressError):
    """A file or data set that is missing, malformed or does not fit the model."""


class UntrustedPickleError(InputError):
    """A pickle that would run code was refused because it was not trusted."""


class FormatError(InputError):
    """A corrupt, truncated or unsupported compressed container."""


class OutputExistsError(CompressError):
    """An output path exists and overwriting was not allowed."""


class CompressWarning(UserWarning):
    """Something the caller should know that is not an error (a .cpz saved without its graph); the CLI
    shows it as a ``note:`` line."""


# ----------------------------------------------------------------------------- naming a parameter
# A message names a parameter the way its reader passes it: ``arch='module:callable'`` to a library
# caller, ``--arch module:callable`` on the command line. Library code names it through ``param()``;
# the CLI's ``main`` runs commands under ``cli_style()``, so that the same message names its flags.
FLAGS: dict[str, str] = {
    "arch": "--arch",
    "trust_pickle": "--trust-pickle",
    "input_shape": "--input-shape",
    "force": "--force",
}
_SWITCHES = frozenset({"trust_pickle", "force"})  # on/off: the flag alone, ``name=True``
_style = {"cli": False}  # process-wide, not per thread: a command's threads (timing, loading) name flags too


@contextlib.contextmanager
def cli_style() -> Iterator[None]:
    """While it lasts, ``param()`` names command-line flags (the CLI's ``main`` runs each command in it)."""
    before = _style["cli"]
    _style["cli"] = True
    try:
        yield
    finally:
        _style["cli"] = before


def param(name: str, value=None) -> str:
    """The parameter ``name`` (a key of ``FLAGS``), with an example or the caller's ``value``, as its reader
    passes it: ``param("arch", "module:callable")`` is ``arch='module:callable'`` for a library caller and
    ``--arch module:callable`` on the command line; ``param("force")`` is ``force=True`` / ``--force``; a
    shape ``(1, "C", "H", "W")`` is ``input_shape=(1, C, H, W)`` / ``--input-shape 1,C,H,W``."""
    flag = FLAGS[name]
    seq = isinstance(value, (tuple, list))
    if _style["cli"]:
        if value is None:
            return flag
        return f"{flag} {','.join(map(str, value)) if seq else value}"
    if value is None:
        return f"{name}=True" if name in _SWITCHES else f"{name}="
    return f"{name}=({', '.join(map(str, value))})" if seq else f"{name}={value!r}"


def first_line(e: BaseException, limit: int = 140) -> str:
    """The first line of an exception's message (its type's name if it has none), at most ``limit``
    characters: what a one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def safe(v, limit: int = 60) -> str:
    """A value read from a file, fit to print: quoted, control characters escaped (no terminal escape
    sequence reaches the user's screen), at most ``limit`` characters of it."""
    text = v if isinstance(v, str) else repr(v)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def printable(text: str) -> str:
    """``text`` with every control or invisible character escaped: the last guard before an error
    message, which may quote a file, reaches the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
