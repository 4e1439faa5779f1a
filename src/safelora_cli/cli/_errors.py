"""Errors as the command line words them: the core's message, then the flag that helps; and the one
place an error becomes a line on stderr and an exit code."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from .. import errors as e_
from ..errors import SafeLoraError
from .console import console, discard, line

if TYPE_CHECKING:
    from .render import Sink


# What to do about an error, in flags: the core's messages state the problem, the command line
# adds how to get past it (the most specific type wins). A hint is a suffix, or a function of the
# error when its fields say what to do.
_HINTS: dict[type[SafeLoraError], str | Callable[[Any], str]] = {
    e_.InPlaceError: "; pass --output DIR for a patched copy",
    e_.OutputError: "; choose another --output",
    e_.OutputNotEmptyError: "; choose another --output, or pass --force to reuse it",
    e_.AlreadyProjectedError: ". Start from the original adapter, or pass --force",
    e_.UnverifiedStampError: (
        " (verify: safelora check --original DIR --base B --aligned A; restore: safelora restore; force: --force)"
    ),
    e_.ChangedSinceError: "; pass --force to do so anyway",
    e_.CheckpointError: " (e.g. --output CHECKPOINT/safelora), or pass --allow-checkpoint",
    e_.DoraError: ". Pass --allow-dora to project lora_B and leave the magnitudes unchanged",
    e_.PrecisionError: "; use --precision float64",
    e_.DeviceError: "; use --device cpu or auto",
    e_.BackupNotKeptError: ", or pass --no-backup",
    e_.HubAccessError: " (--token or HF_TOKEN)",
    e_.HubOfflineError: lambda e: f" (hf download {e.repo_id} --revision {e.revision}) or unset HF_HUB_OFFLINE",
    e_.MissingBaseError: "; pass --base (or --preset)",
    e_.MissingAlignedError: "; pass --aligned (or --preset)",
}


# Fixes the core words without flags (an error's ``fix``), as the command line words them.
_FIXES: dict[type[SafeLoraError], Callable[[Any], str]] = {
    e_.ConfigError: lambda e: "give --config a YAML file of option names and values",
    e_.ConfigFileError: lambda e: "give --config a YAML file of option names and values",
    e_.PlotFileError: lambda e: "choose another --plot path",
    e_.AdapterNotLocalError: lambda e: (
        f"download it first (hf download {e.repo} --local-dir DIR) and pass that directory"
    ),
}


def describe(error: SafeLoraError) -> str:
    """The error's one line as the command line prints it: the problem, then the flag that helps."""
    message = str(error)
    if error.option is not None:
        message = f"--{error.option.replace('_', '-')}{message.removeprefix(error.option)}"
    reword = next((_FIXES[cls] for cls in type(error).__mro__ if cls in _FIXES), None)
    if reword is not None and error.fix is not None and message.endswith(error.fix):
        message = message.removesuffix(error.fix) + reword(error)
    hint = next((_HINTS[cls] for cls in type(error).__mro__ if cls in _HINTS), "")
    return f"{message}{hint if isinstance(hint, str) else hint(error)}"


def err_console() -> Console:
    return console(stderr=True)


def print_error(error: SafeLoraError | str) -> None:
    message = describe(error) if isinstance(error, SafeLoraError) else error
    err_console().print(line(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


@contextmanager
def errors(sink: Sink | None = None, adapters: Callable[[], list[Path]] = list) -> Iterator[None]:
    """The one place errors become a one-line message and an exit code.

    With ``sink``, a failure also gives the JSON ``{"adapter", "error"}`` object for each of
    ``adapters()`` (a usage error, exit 2, gives none). An OS error that escaped the path-specific
    handling, or any other unexpected exception, is still one line and exit 1 (SAFELORA_DEBUG=1 shows
    the traceback): hostile input must never end in a traceback.
    """
    try:
        yield
    except SafeLoraError as e:
        debug(e)
        if sink is not None and e.exit_code == 1:
            targets: list[Path | None] = [*adapters()] or [None]
            for path in targets:
                sink.fail(path, describe(e), echo=False)
            sink.emit(batch=len(adapters()) > 1)
        print_error(e)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        debug(e)
        where = e.filename if e.filename is not None else "I/O"
        print_error(f"{where}: {e.strerror or e.__class__.__name__}")
        raise typer.Exit(1) from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("typer", "click"):
            raise  # usage errors and exits: Typer prints them and exits 2 (or as asked)
        debug(e)
        print_error(f"unexpected {e.__class__.__name__}: {str(e)[:200]}; set SAFELORA_DEBUG=1 for the traceback")
        raise typer.Exit(1) from None


# Typer vendors Click (``typer._click``) from 0.26 on and used Click itself before: the usage errors
# are the classes of whichever module typer.BadParameter comes from.
_click: ModuleType = sys.modules[typer.BadParameter.__module__]
# Whether the app was called to exit (the command line) or, with standalone_mode=False, to raise its
# usage errors to the caller as Click does.
standalone: ContextVar[bool] = ContextVar("standalone", default=True)


@contextmanager
def usage_errors() -> Iterator[None]:
    """Click's usage errors as the command line words them.

    A mistyped option names the one it most likely meant ("No such option: --thresold. Did you mean
    --threshold?"). On a pipe or a file an error is three plain lines, the usage, the help hint and
    the error on one line, so a log shows it whole and grep finds it; on a terminal Typer draws its
    panel. The exit code stays Click's (2 for usage). Called with standalone_mode=False, the app
    raises them to its caller instead, as Click does.
    """
    try:
        yield
    except _click.NoSuchOption as e:
        _usage_error(_click.UsageError(_no_such_option(e), ctx=e.ctx))
    except _click.ClickException as e:
        _usage_error(e)


def _no_such_option(error: Any) -> str:
    """Click lists every close match ("(Possible options: --help, --threshold)"); say the closest."""
    if not error.possibilities:
        return str(error.format_message())
    return f"No such option: {error.option_name}. Did you mean {error.possibilities[0]}?"


def _usage_error(error: Any) -> None:
    """Raise ``error`` for Typer to draw on a terminal; elsewhere print it as three lines and exit."""
    if not standalone.get() or isinstance(error, getattr(_click, "NoArgsIsHelpError", ())):
        raise error
    if err_console().is_terminal:
        raise error
    ctx = error.ctx if isinstance(error, _click.UsageError) else None
    lines = []
    if ctx is not None:
        lines.append(" ".join(ctx.get_usage().split()))
        if ctx.command.get_help_option(ctx) is not None:
            lines.append(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.")
    lines.append(f"error: {' '.join(str(error.format_message()).split())}")
    print("\n".join(lines), file=sys.stderr)
    raise typer.Exit(error.exit_code) from None


def debug(error: BaseException) -> None:
    """SAFELORA_DEBUG=1: the traceback of an error, raised or returned for one adapter of a batch."""
    if os.environ.get("SAFELORA_DEBUG"):
        traceback.print_exception(error)


def best_effort(what: str, write: Callable[[], None]) -> bool:
    """Write one extra output; a failure is a warning on stderr (never the run's exit code)."""
    try:
        write()
        return True
    except Exception as e:
        debug(e)
        message = describe(e) if isinstance(e, SafeLoraError) else f"{e.__class__.__name__}: {str(e)[:200]}"
        err_console().print(
            line(("warning:", "yellow"), f" {what} was not written: ", message), highlight=False, soft_wrap=True
        )
        return False


def after_write(deliver: Callable[[], None]) -> None:
    """Output after the adapters are written: a failure here is a warning, never the run's exit code."""
    try:
        deliver()
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more on stdout, and exit as the run ended.
        discard(sys.stdout)
    except Exception as e:
        with suppress(Exception):
            err_console().print(
                line(
                    ("warning:", "yellow"),
                    f" printing the result failed ({e.__class__.__name__}: {str(e)[:200]}); "
                    "the adapters were processed as the exit code says",
                ),
                highlight=False,
                soft_wrap=True,
            )
