"""The consoles the command line prints through, and one line of Rich text from data."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console
from rich.text import Text

from ..api import printable

# The width of a console that is not a terminal: lines as long as they are, never wrapped (a log or
# a pipe has no width, and a wrapped path or module name no longer greps).
_UNWRAPPED = 100_000


def line(*parts: object) -> Text:
    """One line of Rich text from data: each part is escaped (``printable``) and never read as markup.

    A part is any value (printed with ``str``), or a ``(value, style)`` pair to style it.
    """
    text = Text()
    for part in parts:
        value, style = part if isinstance(part, tuple) and len(part) == 2 else (part, "")
        text.append(printable(value), style=str(style))
    return text


def discard(stream: TextIO) -> None:
    """Point ``stream`` at /dev/null: its reader went away, and later writes (Python's own flush at
    exit included) must not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class _Console(Console):
    """A console whose reader may go away (``safelora project … | head``): from then on it prints
    nothing, and the command goes on, so the rest of a run (a summary, a plot) and its exit code
    stay as they would be. Rich's own default exits with status 1 there."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        discard(sys.stderr if self.stderr else sys.stdout)


def console(*, stderr: bool = False, fit: bool = False) -> Console:
    """A console for people: a terminal's own width, or, on a pipe or a file, lines never wrapped.

    ``fit``: on a pipe or a file, as wide as COLUMNS says when it is set (``COLUMNS=80 safelora
    inspect … > report.txt`` lays its tables out for 80 columns).
    """
    terminal = _Console(stderr=stderr)
    if terminal.is_terminal:
        return terminal
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if fit and columns.isdigit() and int(columns) > 0 else _UNWRAPPED
    return _Console(stderr=stderr, width=width)
