"""The `vaecli` command line (Typer): `app` with its commands, and `main`, the console entry point.

Results go to stdout (`--json` for scripts), messages to stderr. Every `VaecliError` becomes one line
`error: ...` and exit code 1 (2 for usage errors); `--debug` (or VAECLI_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from vaecli.cli import describe, jobs  # noqa: F401 - registers the commands on `app`
from vaecli.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point.

    When the command has finished, the process exits without the interpreter's teardown: torch's finalizers (and
    those of torch._dynamo, which meta tracing imports) take 0.3-0.6 s on 2 cores, after every output is already
    written and closed. Streams are flushed first; nothing else is pending (worker threads are joined by then).
    """
    try:
        app(prog_name="vaecli")  # the same name (and completion variable) under `python -m vaecli`
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`vaecli ... | head`): the reader wanted no more
            pass
    os._exit(code)

