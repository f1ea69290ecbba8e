"""The command-line layer: one place for errors, signals and the ``mlx_llama3v`` entry point.

Every command is a typer app whose commands are registered with ``command(app)``: a
``UserError`` (any module's error for bad input) becomes one ``error: ...`` line on stderr
and exit status 2. ``run_app(app, prog)`` is each command's ``main()``: SIGTERM unwinds like
Ctrl-C (so staging folders and caches are cleaned up), and stdout that cannot be written
(``> /dev/full``, a closed pipe) is one error line, not a traceback.

``mlx_llama3v SUBCOMMAND ...`` runs ``mlx_llama3v.SUBCOMMAND ...`` (like ``mlx_lm``'s CLI);
the ``mlx_llama3v.X`` console scripts and ``python -m mlx_llama3v.X`` stay.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import signal
import sys
from typing import Callable, NoReturn

import typer

from . import cpu
from .errors import UserError, one_line

# subcommand -> the module whose main() runs it
SUBCOMMANDS = {
    "convert": "mlx_llama3v.convert.cli",
    "generate": "mlx_llama3v.generation.generate",
    "chat": "mlx_llama3v.generation.chat",
    "embed": "mlx_llama3v.embed.cli",
    "train": "mlx_llama3v.train.cli",
    "fuse": "mlx_llama3v.fuse",
    "server": "mlx_llama3v.server.cli",
}


def fail(message, code: int = 2) -> NoReturn:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def command(app: typer.Typer, **kwargs) -> Callable:
    """``app.command(**kwargs)``, with every ``UserError`` reported as one line."""

    def register(func):
        @functools.wraps(func)
        def run(*args, **kw):
            try:
                return func(*args, **kw)
            except UserError as e:
                fail(e, e.exit_code)

        return app.command(**kwargs)(run)

    return register


def new_app() -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run_app(app: typer.Typer, prog_name: str) -> None:
    """Run a command's app as its ``main()``."""
    cpu.enable()  # the Linux CPU speed-ups for every command (mlx_llama3v/cpu.py)
    # SIGTERM unwinds like Ctrl-C: finally blocks remove temporary files and folders
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        app(prog_name=prog_name)
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF):
            raise
        _stdout_failed(e)


def _stdout_failed(e: OSError) -> NoReturn:
    """stdout cannot take the output: say so once, and keep the exit flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    reason = os.strerror(e.errno) if e.errno else one_line(e)
    print(f"error: cannot write the output to stdout: {reason}", file=sys.stderr, flush=True)
    sys.exit(2)


def main() -> None:
    """``mlx_llama3v SUBCOMMAND [OPTIONS]``."""
    names = ", ".join(SUBCOMMANDS)
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: mlx_llama3v SUBCOMMAND [OPTIONS]; subcommands: {names}")
        print("Help on one: mlx_llama3v SUBCOMMAND --help")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "--version":
        from . import __version__

        print(__version__)
        return
    sub = sys.argv.pop(1)
    if sub not in SUBCOMMANDS:
        print(f"error: no subcommand {sub!r}; choose one of {names}", file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"mlx_llama3v {sub}"
    importlib.import_module(SUBCOMMANDS[sub]).main()
