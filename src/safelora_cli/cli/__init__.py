"""The ``safelora`` command line: parse, call the Python API (``api``), render through one sink. No math here.

This module only assembles the app: each command group lives in its own module.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .._version import __version__
from . import cache, check, demo, eval, project, sign
from ._options import Command, Group

app = typer.Typer(
    cls=Group,
    help="Safe LoRA for LoRA adapters (PEFT, MLX-LM, GGUF): project each LoRA update onto the alignment subspace of "
    "W_aligned − W_base when it looks unlike it. Exit codes: 0 done, 1 input or I/O error, 2 usage, "
    "3 (check and sign) not sanitized, not verified, modified since, or another pair.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(cls=Command, epilog=project.EXAMPLES)(project.project)
app.command(cls=Command, epilog=demo.EXAMPLES)(demo.demo)
app.command(cls=Command, epilog=check.CHECK_EXAMPLES)(check.check)
app.command("inspect", cls=Command, epilog=check.INSPECT_EXAMPLES)(check.inspect_)
app.command(cls=Command, epilog=check.RESTORE_EXAMPLES)(check.restore)
app.command(cls=Command, epilog=sign.EXAMPLES)(sign.sign)
app.command("eval", cls=Command, epilog=eval.EXAMPLES)(eval.eval_)
app.add_typer(cache.app, name="cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safelora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.", metavar=""),
    ] = False,
) -> None:
    """Safe LoRA for PEFT adapters."""


def main() -> None:
    """Console-script entry point."""
    app()
