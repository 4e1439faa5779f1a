"""Commands over several adapters: their paths for messages, Ctrl-C, and each one's outcome delivered."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from .. import api
from ..errors import SafeLoraError
from ._errors import debug, describe, err_console
from .console import line

if TYPE_CHECKING:
    from .render import Sink

T = TypeVar("T")


@contextmanager
def interruptible(paths: Callable[[], list[Path]], in_place: bool) -> Iterator[None]:
    """Ctrl-C: exit 130, with one line that says which adapters are unchanged (every rewrite is atomic)."""
    before = {p: _weights_identity(p) for p in paths()} if in_place else {}
    try:
        yield
    except KeyboardInterrupt:
        unchanged = [p for p, st in before.items() if st is not None and _weights_identity(p) == st]
        changed = [p for p in before if p not in unchanged]
        told = "interrupted"
        if unchanged:
            told += f"; unchanged: {', '.join(map(str, unchanged))}"
        if changed:
            told += f"; written before the interrupt: {', '.join(map(str, changed))}"
        with suppress(Exception):
            err_console().print(line(("interrupted", "bold red"), told.removeprefix("interrupted")), highlight=False)
        raise typer.Exit(130) from None


def _weights_identity(adapter: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.lstat(api.weights_file(adapter))
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def expanded(specs: list[str]) -> Callable[[], list[Path]]:
    """The adapter directories ``specs`` name, for messages about them (never raises): expanded
    once, when first asked for."""

    @cache
    def paths() -> list[Path]:
        try:
            return api.adapter_paths(specs)
        except SafeLoraError:
            return [Path(s) for s in specs]

    return paths


def deliver(
    sink: Sink,
    outcomes: Sequence[T | SafeLoraError],
    to_json: Callable[[T], dict[str, Any]],
    render: Callable[[T, Console], None],
) -> None:
    """Each adapter's outcome into the sink: its document and how people see it, or its error."""
    for outcome in outcomes:
        if isinstance(outcome, SafeLoraError):
            debug(outcome)
            sink.fail(outcome.adapter, describe(outcome))
        else:
            sink.add(to_json(outcome), partial(render, outcome))
