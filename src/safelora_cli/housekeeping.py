"""The projection cache and the kept originals, as ``safelora cache`` lists and removes them: library
functions the command line calls (re-exported by ``api``), never the stores' files directly."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SafeLoraError
from .options import StrPath
from .results import Backup

if TYPE_CHECKING:
    from .stores.cache import PairSummary


@dataclass(frozen=True)
class CacheListing:
    """What the projection cache and the backup store hold."""

    pairs: list[PairSummary]
    backups: list[Backup]
    backups_root: Path


@dataclass(frozen=True)
class ClearedPairs:
    """``cache_clear``: the pairs removed, and the keys of those kept (a running safelora computes them)."""

    removed: list[PairSummary]
    kept: list[str]
    root: Path


@dataclass(frozen=True)
class RemovedBackups:
    """Kept originals removed; ``kept_for_other_adapters`` counts those another adapter still needs."""

    removed: list[Backup]
    root: Path
    kept_for_other_adapters: int = 0


def cache_list() -> CacheListing:
    """The cached pairs (with their modules) and the kept originals."""
    from .stores.backups import BackupStore
    from .stores.cache import ProjectionCache

    store = BackupStore()
    return CacheListing(ProjectionCache().pairs(), store.all(), store.root)


def cache_remove(key: str) -> PairSummary:
    """Remove one pair's cached operators, by its key or a unique prefix of it."""
    from .stores.cache import ProjectionCache

    return ProjectionCache().remove(key)


def cache_clear() -> ClearedPairs:
    """Remove every cached pair but those a running safelora is computing."""
    from .stores.cache import ProjectionCache

    cache = ProjectionCache()
    removed, kept = cache.clear()
    return ClearedPairs(removed, kept, cache.root)


def backups_to_remove(adapters: Sequence[StrPath] = (), *, older_than_days: float | None = None) -> list[Backup]:
    """The kept originals ``remove_backups`` would delete: those kept for ``adapters`` (when given) that
    no other adapter needs, or every one kept more than ``older_than_days`` days ago (or every one)."""
    if adapters:
        return [b for b, dirs in _backups_of(adapters) if set(b.adapters) <= dirs or not b.adapters]
    from .stores.backups import BackupStore

    limit = time.time() - older_than_days * 86400 if older_than_days is not None else None
    return [b for b in BackupStore().all() if limit is None or b.created < limit]


def remove_backups(adapters: Sequence[StrPath] = (), *, older_than_days: float | None = None) -> RemovedBackups:
    """Delete the kept originals ``backups_to_remove`` names; for ``adapters``, a backup another
    adapter still needs is kept, and only these adapters are taken off its record."""
    from .stores.backups import BackupStore

    store = BackupStore()
    if not adapters:
        gone = backups_to_remove(older_than_days=older_than_days)
        store.remove(gone)  # and the local records of what was written, of that age
        store.remove_written(None if older_than_days is None else time.time() - older_than_days * 86400)
        return RemovedBackups(gone, store.root)
    chosen = _backups_of(adapters)
    gone = [b for b, dirs in chosen if set(b.adapters) <= dirs or not b.adapters]
    store.remove(gone)
    for backup, dirs in chosen:
        if backup not in gone:
            for d in dirs:
                store.forget(backup, d)
    return RemovedBackups(gone, store.root, len(chosen) - len(gone))


def _backups_of(targets: Sequence[StrPath]) -> list[tuple[Backup, set[str]]]:
    """The backups kept for these adapter directories: the one each one's provenance names, and any
    recorded for its path. Each with the directories (absolute) it is being removed for."""
    from . import adapters as adapter_io
    from .stores.backups import BackupStore

    store = BackupStore()
    kept = store.all()
    chosen: dict[str, tuple[Backup, set[str]]] = {}
    for target in targets:
        where = os.path.abspath(target)
        found = [b for b in kept if where in b.adapters]
        if os.path.isdir(target):
            with adapter_io.opened(Path(target)) as opened:
                sha = opened.provenance().get(adapter_io.PROVENANCE_PREFIX + "original")
            found += [b for b in kept if b.sha256 == sha]
        if not found:
            raise SafeLoraError(f"{os.fspath(target)}: no kept original in {store.root}")
        for b in found:
            chosen.setdefault(b.sha256, (b, set()))[1].add(where)
    return list(chosen.values())
