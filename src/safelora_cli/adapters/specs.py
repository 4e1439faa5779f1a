"""Adapter paths as the user gave them: patterns expanded, each location opened once."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterError, UsageError
from ..io import safefs


@dataclass
class Named:
    """An adapter directory as the user named it, opened once (or why it could not be)."""

    path: Path
    dir: safefs.Directory | None
    error: AdapterError | None = None
    notes: list[str] = field(default_factory=list)


def expand(specs: Sequence[str | os.PathLike[str]], claims: Callable[[Path], bool]) -> list[tuple[Path, str | None]]:
    """Adapter paths from what the user gave, each with a note when it came from a pattern.

    A path that exists is taken literally, even if it holds ``*``, ``?`` or ``[``; a pattern is
    expanded (sorted) only when no such path exists. It takes every directory it matches, and every
    other match that ``claims`` (a format finds its adapter in that file by its content: a GGUF
    LoRA file, whatever its name); the others (a README, a log, a FIFO) are left out, named in the
    note. One that takes nothing is a usage error naming what it left out.
    """
    out: list[tuple[Path, str | None]] = []
    for spec in specs:
        text = os.fspath(spec)
        if os.path.lexists(text) or not glob.has_magic(text):
            out.append((Path(text), None))
            continue
        matches: list[str] = []
        left_out: list[str] = []
        for m in sorted(glob.glob(text)):
            (matches if os.path.isdir(m) or claims(Path(m)) else left_out).append(m)
        unclaimed = f"; left out, no adapter format claims them by content: {', '.join(left_out)}" if left_out else ""
        if not matches:
            raise UsageError(
                f"{text!r}: no such path, and as a pattern it matches no adapter directory or adapter file{unclaimed}"
            )
        note = f"{text!r} matched {len(matches)}: " + ", ".join(matches)
        out.extend((Path(m), note + unclaimed) for m in matches)
    return out


def names_several(specs: Sequence[str | os.PathLike[str]]) -> bool:
    """Whether ``specs`` name a batch: more than one spec, or a pattern (``expand``'s rule), whatever
    it matches, so that a batch's layout does not change with the number of matches."""
    return len(specs) > 1 or any(glob.has_magic(os.fspath(s)) and not os.path.lexists(s) for s in specs)


def output_name(path: Path) -> str:
    """The name an adapter's output takes in a batch's output directory: its directory's name (a
    format stored as a single file adds its suffix here)."""
    return Path(os.path.abspath(path)).name


@contextmanager
def open_all(
    specs: Sequence[str | os.PathLike[str]],
    open_one: Callable[[Path], safefs.Directory],
    claims: Callable[[Path], bool],
) -> Iterator[list[Named]]:
    """Expand (``expand``, with ``claims``) and open every adapter once (``open_one``); closed on exit.

    The same directory named twice (directly, via ``..`` or a symlink alias, or by two patterns)
    is processed once, with a note: a batch never waits on its own lock.
    """
    with ExitStack() as stack:
        named: list[Named] = []
        seen: dict[tuple[int, int], Named] = {}
        for path, note in expand(specs, claims):
            notes = [note] if note else []
            try:
                directory = stack.enter_context(open_one(path))
            except AdapterError as e:
                if not any(n.path == path and n.error is not None for n in named):
                    named.append(Named(path, None, e, notes))
                continue
            first = seen.get(directory.identity)
            if first is not None:
                if path != first.path:
                    first.notes.append(f"{path} is the same adapter directory as {first.path}: processed once")
                continue
            seen[directory.identity] = item = Named(path, directory, None, notes)
            named.append(item)
        yield named
