"""Running one command line: the library's errors and warnings become one line on stderr and an exit code.

``main()`` maps compress's own exceptions (and click's usage errors) to one line on stderr and an
exit code (2 usage, 1 failure). ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import typer

from compress.cli.app import GLOBAL_FLAGS, app
from compress.cli.common import err
from compress.errors import CompressError, CompressWarning, cli_style, first_line, printable


def main(argv: list[str] | None = None) -> int:
    """Run one command line; the library's messages name its flags (``errors.cli_style``) and its warnings
    (``errors.CompressWarning``) are ``note:`` lines."""
    with cli_style(), warnings.catch_warnings():
        warnings.simplefilter("always", CompressWarning)
        show = warnings.showwarning

        def note(message, category, *args, **kw) -> None:
            if issubclass(category, CompressWarning):
                err.print(f"note: {printable(str(message))}", markup=False)
            else:  # another library's warning: as Python shows it
                show(message, category, *args, **kw)

        warnings.showwarning = note
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    # global flags mean the same before or after the command: move them in front of it
    front, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a in GLOBAL_FLAGS or a.startswith("--device="):
            front.append(a)
        elif a == "--device" and i + 1 < len(args):  # a flag with a value: both move
            front += args[i : i + 2]
            i += 1
        else:
            rest.append(a)
        i += 1
    args = front + rest
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name="compress", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 1
    except typer.TyperException as e:  # click-style usage errors (bad flag, missing argument ...)
        if type(e).__name__ == "NoArgsIsHelpError":
            print(e.format_message(), file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        msg = " ".join(e.format_message().split())
        ctx = getattr(e, "ctx", None)
        hint = (
            f" (see 'compress {ctx.command_path.split(' ', 1)[1]} --help')"
            if ctx is not None and " " in ctx.command_path
            else ""
        )
        print(f"error: {msg}{hint}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except CompressError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {printable(first_line(e, 10_000))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied ...: not a bug of ours
        if debug:
            traceback.print_exc()
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("error: out of memory (a batch, model or file larger than this machine holds)", file=sys.stderr)
        return 1
    except Exception as e:  # anything else is a bug of compress's: still one line; --debug shows where
        if debug:
            traceback.print_exc()
        print(
            f"error: internal error: {type(e).__name__}: {printable(first_line(e, 300))} (run with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def entry() -> None:
    sys.exit(main())
