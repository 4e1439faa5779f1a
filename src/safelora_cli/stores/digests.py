"""Content digests memoized by file stat: what a checkpoint's tensors hash to, without reading them.

A checkpoint's content identity (``sources/identity.py``) costs a read of every tensor a run uses.
A run that finds its operators in the projection cache reads none, so the digests of a checkpoint
are kept too, under the identity its files' stat gives (``Source.cache_identity``: the resolved path
and each shard's name, size, inode, mtime and ctime; a Hub commit sha), in ``digests/`` of a store:

    digests/<key>.json   {"format": "1", "identity": ..., "tensors": {name: digest}}

One memo per store, and each store trusts only its own: a run reads the projection cache's (the
run already trusts that cache for its operators), ``check`` only the backup store's, which no CI
system shares. The memo follows its store's ownership rule (a memo that breaks it is not used); a
memo that cannot be read or parsed, or names another identity, counts as empty: the digests are
computed again. Writes are best effort: a temp file and a rename, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

from ..errors import SafeLoraError
from ..io import atomic, strict
from . import cache_entries as entries
from . import ownership

FORMAT = "1"
DIR = "digests"


def _memo_file(name: str) -> bool | None:
    return True if name.endswith(".json") else None


class DigestMemo:
    """The memo in ``root``/digests, used only while ``usable()`` (the store's own rule holds)."""

    def __init__(self, root: Path, rule: ownership.Rule, store_problem: str | None) -> None:
        self.dir = root / DIR
        self._rule = rule
        self._store_problem = store_problem

    @cached_property
    def problem(self) -> str | None:
        return self._store_problem or self._rule.checked(lambda: self._rule.contents(self.dir, _memo_file), self.dir)

    def _path(self, identity: str) -> Path:
        return self.dir / f"{entries.hash_key(FORMAT, identity, length=32)}.json"

    def load(self, identity: str) -> dict[str, str]:
        """The digests kept for ``identity``; empty when none are, or the memo cannot be trusted."""
        if self.problem is not None:
            return {}
        try:
            doc = strict.loads(entries.read_small(self._path(identity), SafeLoraError))
        except (SafeLoraError, strict.InvalidJSON):
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("identity") != identity:
            return {}
        tensors = doc.get("tensors")
        if not isinstance(tensors, dict):
            return {}
        return {k: v for k, v in tensors.items() if isinstance(k, str) and _is_digest(v)}

    def save(self, identity: str, tensors: Mapping[str, str]) -> None:
        """Add ``tensors`` to what is kept for ``identity`` (best effort)."""
        if self.problem is not None or not tensors:
            return
        kept = self.load(identity)
        if all(kept.get(k) == v for k, v in tensors.items()):
            return
        doc = {"format": FORMAT, "identity": identity, "tensors": dict(sorted({**kept, **tensors}.items()))}
        try:
            ownership.mkdirs(self.dir)
            atomic.write_unsynced(self._path(identity), [json.dumps(doc).encode()], ownership.FILE_MODE, entries.TMP)
        except OSError:
            pass


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
