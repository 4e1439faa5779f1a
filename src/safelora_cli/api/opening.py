"""How the API opens what it is given: adapters (expanded, each opened once), the base/aligned pair,
and a list or a single adapter's outcome."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterNotLocalError, SafeLoraError, SourceError, UsageError
from ..options import StrPath

if TYPE_CHECKING:
    from .. import adapters as adapter_io
    from .. import sources
    from ..io import safefs
    from ..stores.digests import DigestMemo


def open_pair(
    stack: ExitStack,
    pair: tuple[tuple[StrPath, str | None], tuple[StrPath, str | None]],
    hub: sources.Hub,
    transfer: sources.Transfer,
    notes: list[str],
    memo: DigestMemo | None,
) -> tuple[sources.Source, sources.Source]:
    """Base and aligned opened (closed with ``stack``), each with the digests ``memo`` keeps for it."""
    from .. import sources

    opened = []
    for (spec, revision), role in zip(pair, ("base", "aligned"), strict=True):
        src = sources.open_source(os.fspath(spec), revision, role=role, transfer=transfer, notes=notes, settings=[hub])
        stack.callback(src.close)
        src.memo = memo
        src.digests.update(memo.load(src.cache_identity()) if memo is not None else {})
        opened.append(src)
    return opened[0], opened[1]


def refuse_same(base: sources.Source, aligned: sources.Source) -> None:
    """Base and aligned that are one checkpoint (every V would be 0), when that costs no read: the same
    files by any path, one Hub commit. Other copies of one content: the run, once it has hashed them."""
    same = base.cache_identity() == aligned.cache_identity()
    if base.revision is not None and aligned.revision is not None:
        same = same or base.revision == aligned.revision  # one commit sha is one tree
    elif base.revision is None and aligned.revision is None:
        same = same or base.fingerprint() == aligned.fingerprint()  # the same files (inodes), by any path
    if same:
        raise SourceError(
            f"base {base.label} and aligned {aligned.label} are the same checkpoint: every V = W_aligned − W_base "
            "would be 0; pass the unaligned base model as base and the chat model as aligned"
        )


def dir_of(named: adapter_io.Named) -> safefs.Directory:
    """The adapter's opened location, or the error that kept it from opening."""
    if named.dir is None:
        raise named.error or SafeLoraError(f"{named.path}: cannot be read")
    return named.dir


def one_named(adapter: StrPath | list[StrPath], opened: list[adapter_io.Named]) -> None:
    """A path or pattern given alone must name one adapter: a list is what names several."""
    if not isinstance(adapter, list) and len(opened) != 1:
        raise UsageError(f"{os.fspath(adapter)!r} names {len(opened)} adapters; pass a list to name several")


def each(adapter: StrPath | list[StrPath], one: Callable[[StrPath], Any]) -> Any:
    """``one`` for the adapter, or for each adapter a list names (patterns expanded), its result or its
    ``SafeLoraError`` in the list (a usage error still raises)."""
    if not isinstance(adapter, list):
        if len(paths := adapter_paths([adapter])) != 1:
            raise UsageError(f"{os.fspath(adapter)!r} names {len(paths)} adapters; pass a list to name several")
        return one(adapter)
    outcomes: list[Any] = []
    for path in adapter_paths(adapter):
        try:
            outcomes.append(one(path))
        except UsageError:
            raise
        except SafeLoraError as e:
            e.adapter = path
            outcomes.append(e)
    return outcomes


def adapter_paths(specs: Sequence[StrPath]) -> list[Path]:
    """The adapter directories ``specs`` name (globs expanded), without opening them."""
    from .. import adapters as adapter_io

    return [path for path, _ in adapter_io.expand(specs)]


@contextmanager
def open_adapters(specs: Sequence[StrPath]) -> Iterator[list[adapter_io.Named]]:
    """Every adapter expanded and opened once (``adapters.open_all``), where a Hub repo id given as an
    adapter that is no local path is named as such."""
    from .. import adapters as adapter_io
    from .. import sources

    with adapter_io.open_all(specs) as opened:
        for named in opened:
            ref = sources.parse_ref(str(named.path))
            if named.error is not None and ref is not None and ref.revision is None and not os.path.lexists(named.path):
                named.error = AdapterNotLocalError(
                    f"{named.path}: no such directory, and adapters are local directories", str(named.path)
                )
        yield opened


def weights_file(adapter: Path) -> Path:
    """The file ``project`` and ``restore`` rewrite for an adapter (by name alone: this never opens
    it): a single-file adapter (GGUF) is that file; in a directory, PEFT's weights, else MLX-LM's when
    only that is there."""
    from ..adapters.mlx_config import WEIGHTS_FILE
    from ..adapters.peft_config import ADAPTER_FILE

    if os.path.isfile(adapter):
        return adapter
    peft, mlx = adapter / ADAPTER_FILE, adapter / WEIGHTS_FILE
    return mlx if not os.path.lexists(peft) and os.path.lexists(mlx) else peft


def one_or_all(adapter: StrPath | list[StrPath], outcomes: list[Any]) -> Any:
    """One adapter's outcome (raised when it is an error), or every adapter's for a list: a list
    exactly when given one (a path or pattern that names several adapters is refused before)."""
    if not isinstance(adapter, list):
        [only] = outcomes
        if isinstance(only, SafeLoraError):
            raise only
        return only
    return outcomes


def specs_of(adapter: StrPath | list[StrPath]) -> list[StrPath]:
    return list(adapter) if isinstance(adapter, list) else [adapter]
