"""The projection cache: each module's operator per (base, aligned) pair, shared by every run.

Layout under the root (``SAFELORA_CACHE``, else ``$XDG_CACHE_HOME/safelora``, else ``~/.cache/safelora``):

    pairs/<pair key>/pair.json                which checkpoints: repo id + commit sha, or path + fingerprint
    pairs/<pair key>/<entry key>.safetensors  one module's operator (V, float32) and its metadata
    pairs/<pair key>/.lock                    flock'd by the run that computes missing entries
    refs/<key>.json                           the last commit seen for each Hub branch or tag
    digests/<key>.json                        each checkpoint's tensor digests, by file stat (``digests.py``)

Every file name is a hash, so no repo id or path can make a name that leaves the root. Entries are
written to a temp file and renamed into place, so a reader sees a whole entry or none, and each
carries a CRC-32 of everything a run takes from it (its metadata, shape and data), so a corrupt one
is detected and recomputed instead of served. That check is also why entries are not fsync'd: an
entry torn by a power loss fails it and is recomputed, while an fsync per entry would make a first
run wait for gigabytes to reach the disk.

A checksum stops corruption, not someone who writes a matching one. That is the ownership rule's
job, the rule ssh applies to its keys: the cache is used only when the root and everything in it
that a run uses belong to the effective user and no one else may write them, and when no one else
may replace a directory on the way to the root (see ``ProjectionCache.problem``). Everything the
cache creates is created mode 0700 (directories) or 0600 (files), whatever the umask.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import CacheError
from ..io import locks, safefs, strict
from . import cache_entries as entries
from . import ownership
from .cache_entries import CorruptEntry, EntrySummary, Stored
from .pairs import PairCache
from .refs import RefMemo, refs_file

__all__ = [
    "CorruptEntry",
    "EntrySummary",
    "PairCache",
    "PairSummary",
    "ProjectionCache",
    "RefMemo",
    "Stored",
    "cache_root",
]


def cache_root() -> Path:
    """Where the cache lives: ``SAFELORA_CACHE``, else the XDG cache directory's ``safelora``."""
    env = os.environ.get("SAFELORA_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "safelora"


@dataclass(frozen=True)
class PairSummary:
    key: str
    base: str
    aligned: str
    path: Path
    entries: list[EntrySummary]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class ProjectionCache:
    """The cache root: pairs to run with, and what ``safelora cache`` lists and removes."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cache_root()
        self.refs = RefMemo(self)

    def problem(self) -> str | None:
        """Why a run must not use this cache, as a one-line warning that names the path and the fix; or None.

        The ownership rule, as ssh applies it to its keys: the root, ``pairs/``, ``refs/`` and the
        files in ``refs/`` must belong to the effective user and be writable by no one else; every
        directory and link on the way to the root must belong to that user or to root, and such a
        directory must be writable by no one else unless it has the sticky bit (as /tmp). A pair's
        own directory and files are checked by ``PairCache.problem``. What does not exist yet
        passes: safelora creates it, mode 0700 or 0600.
        """
        return self._rule

    @cached_property
    def _rule(self) -> str | None:  # checked once, on first use
        return (
            entries.RULE.checked(lambda: entries.RULE.root(self.root), self.root)
            or entries.RULE.checked(lambda: entries.RULE.contents(self.root / "pairs"), self.root / "pairs")
            or entries.RULE.checked(lambda: entries.RULE.contents(self.refs.dir, refs_file), self.refs.dir)
        )

    def pair(self, base_identity: str, aligned_identity: str) -> PairCache:
        return PairCache(self, base_identity, aligned_identity)

    def _pairs_dir(self) -> Path | None:
        """``pairs/`` when it is a directory (a link there is never followed)."""
        path = self.root / "pairs"
        try:
            st = entries.lstat(path)
        except OSError as e:
            raise CacheError(safefs.os_error(path, e)) from None
        return path if st is not None and stat.S_ISDIR(st.st_mode) else None

    def pairs(self) -> list[PairSummary]:
        """Every cached pair with its entries, read from manifests and entry headers only.

        A pair is a directory in ``pairs/``; links and other files there are not followed or listed.
        """
        pairs_dir = self._pairs_dir()
        if pairs_dir is None:
            return []
        return [_summary(pairs_dir / name) for name in _names(pairs_dir) if _is_dir(pairs_dir / name)]

    def find(self, prefix: str) -> PairSummary:
        """The one pair whose key starts with ``prefix`` (as ``safelora cache ls`` prints it)."""
        found = [p for p in self.pairs() if prefix and p.key.startswith(prefix.lower())]
        if len(found) != 1:
            what = "no cached pair" if not found else f"{len(found)} cached pairs"
            raise CacheError(f"{what} with a key starting with {prefix!r}; `safelora cache ls` lists the keys")
        return found[0]

    def remove(self, prefix: str) -> PairSummary:
        """Delete one pair; refused while a run holds its lock."""
        pair = self.find(prefix)
        _remove_pair(pair.path)
        return pair

    def clear(self) -> tuple[list[PairSummary], list[str]]:
        """Delete every pair and the refs and digest memos; returns the pairs removed and the messages of those kept.

        A pair that a running safelora holds locked is kept (and named), not waited for. Links and
        other stray files in the cache are removed themselves, never what they point to.
        """
        removed, kept = [], []
        for pair in self.pairs():
            try:
                _remove_pair(pair.path)
            except CacheError as e:
                kept.append(str(e))
            else:
                removed.append(pair)
        pairs_dir = self._pairs_dir()
        if pairs_dir is None:
            strays = [self.root / "pairs"]
        else:
            strays = [pairs_dir / name for name in _names(pairs_dir) if not _is_dir(pairs_dir / name)]
        for path in [*strays, self.refs.dir, self.root / "digests"]:
            try:
                _remove(path)
            except OSError as e:
                kept.append(safefs.os_error(path, e))
        return removed, kept


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError as e:
        raise CacheError(safefs.os_error(directory, e)) from None


def _is_dir(path: Path) -> bool:
    """Whether ``path`` itself is a directory (not a link to one)."""
    try:
        st = entries.lstat(path)
    except OSError:
        return False
    return st is not None and stat.S_ISDIR(st.st_mode)


def _remove(path: Path) -> None:
    """Remove what is at ``path``, if anything: a directory whole (``rmtree`` follows no link inside
    it), anything else (a link, a FIFO) by unlinking the name, never what it points to."""
    st = entries.lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_pair(path: Path) -> None:
    """Delete a pair's directory under its lock; a lock that is not a regular file cannot be held by a run."""
    try:
        fd: int | None = locks.open_file(path / ".lock", ownership.FILE_MODE)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EINVAL):  # a lock no run can hold: remove without it
            raise CacheError(f"{path}: cannot remove ({e.strerror})") from None
        fd = None
    try:
        if fd is not None:
            try:
                locks.acquire(fd, None)
            except BlockingIOError:
                raise CacheError(
                    f"{path.name}: a safelora run is computing this pair right now; remove it when that run ends"
                ) from None
        shutil.rmtree(path)
    except OSError as e:
        raise CacheError(f"{path}: cannot remove ({e.strerror})") from None
    finally:
        if fd is not None:
            os.close(fd)


def _summary(path: Path) -> PairSummary:
    try:
        doc: Any = strict.loads(entries.read_small(path / "pair.json", CacheError))
        base, aligned = doc["base"], doc["aligned"]
        if not (isinstance(base, str) and isinstance(aligned, str)):
            raise TypeError
    except (CacheError, ValueError, KeyError, TypeError):
        base = aligned = "?"
    try:
        names = _names(path)
    except CacheError:
        names = []  # listed as a pair without entries: `cache rm` and `clear` still remove it
    found = [entries.entry_summary(path / name) for name in names if name.endswith(".safetensors")]
    found.sort(key=lambda e: e.module)
    return PairSummary(path.name, base, aligned, path, found)
