"""``safelora demo``: a tiny example built from nothing, projected, with the next commands to try."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from ..errors import SafeLoraError
from . import render as rendering
from ._errors import errors
from ._options import OUTPUT, JsonLinesOpt, QuietOpt
from .console import line

EXAMPLES = """Examples:

  safelora demo

  safelora demo --keep demo
"""


def demo(
    keep: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Build the example in this directory (new or empty) and keep it, to try the other commands on "
            "(default: a temp directory, removed afterwards).",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    as_json: JsonLinesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a tiny base/aligned/adapter set (no downloads) and run `project --output` on it.

    With --keep DIR, DIR holds base/, aligned/, adapter/ (left as built) and sanitized/ (the
    projected copy), and the next commands to try are printed.
    """
    sink = rendering.Sink(as_json=as_json, quiet=quiet, lines=True)
    with errors(sink), tempfile.TemporaryDirectory(prefix="safelora-demo-") as tmp:
        if keep is not None:
            _require_empty(keep)
        root = keep or Path(tmp)
        base, aligned, adapter = api.build_demo(root)
        out = root / "sanitized"
        sink.show(
            lambda c: c.print(
                line((f"tiny example in {root}: base (sharded), aligned, adapter (q_proj/v_proj, r=8)", "dim"))
            )
        )
        program = _program()
        shown = " ".join(shlex.quote(str(p)) for p in (adapter, "--base", base, "--aligned", aligned, "--output", out))
        sink.show(lambda c: c.print(line((f"$ {program} project {shown}", "dim"))))
        report = api.project(adapter, base=str(base), aligned=str(aligned), output=out)
        sink.add(report.to_json(), lambda console: rendering.render(report, console))
        sink.emit()
        if keep is not None:
            sink.show(lambda c: rendering.render_next_steps(root, program, c))


def _program() -> str:
    """How to run this safelora again from here: ``safelora`` when that is what PATH finds, else the
    path it was started by (``.venv/bin/safelora`` after ``make demo``)."""
    invoked = sys.argv[0]
    if Path(invoked).name != "safelora":
        return "safelora"  # python -m safelora_cli, or an embedding: the installed name
    found = shutil.which("safelora")
    if found is not None and os.path.realpath(found) == os.path.realpath(invoked):
        return "safelora"
    return shlex.quote(invoked)


def _require_empty(path: Path) -> None:
    """``demo --keep``: a new directory, or an empty one; never one that holds anything."""
    try:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            raise SafeLoraError(f"{path}: exists and is not a directory; pass a new or empty directory to --keep")
        if any(path.iterdir()):
            raise SafeLoraError(f"{path}: exists and is not empty; pass a new or empty directory to --keep")
    except OSError as e:
        raise SafeLoraError(f"{path}: {e.strerror}") from None
