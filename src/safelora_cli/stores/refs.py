"""The commit each Hub branch or tag last resolved to, kept in the projection cache's ``refs/``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CacheError
from ..io import atomic, strict
from . import cache_entries as entries
from . import ownership


def refs_file(name: str) -> bool | None:
    """How a run uses ``name`` in ``refs/`` (see ``ownership.Rule.contents``)."""
    return True if name.endswith(".json") else None


class RefMemo:
    """The commit each Hub branch or tag last resolved to, so HF_HUB_OFFLINE=1 runs can name the pair.

    Not used (nothing read, nothing written) while the cache breaks the ownership rule.
    """

    def __init__(self, cache: entries.CacheRoot) -> None:
        self.dir = cache.root / "refs"
        self._cache = cache

    def _path(self, endpoint: str, repo_id: str) -> Path:
        return self.dir / f"{entries.hash_key(endpoint, repo_id, length=32)}.json"

    def _read(self, endpoint: str, repo_id: str) -> dict[str, str]:
        try:
            doc = strict.loads(entries.read_small(self._path(endpoint, repo_id), CacheError))
            refs = doc["refs"]
            return {k: v for k, v in refs.items() if isinstance(k, str) and isinstance(v, str)}
        except (CacheError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def get(self, endpoint: str, repo_id: str, revision: str) -> str | None:
        if self._cache.problem() is not None:
            return None
        return self._read(endpoint, repo_id).get(revision)

    def put(self, endpoint: str, repo_id: str, revision: str, sha: str) -> None:
        """Best effort: the memo only helps offline runs, so a failed write is not an error."""
        if self._cache.problem() is not None:
            return
        refs = self._read(endpoint, repo_id)
        if refs.get(revision) == sha:
            return
        refs[revision] = sha
        doc = {"endpoint": endpoint, "repo": repo_id, "refs": refs}
        try:
            ownership.mkdirs(self.dir)
            atomic.write_unsynced(
                self._path(endpoint, repo_id), [json.dumps(doc, indent=2).encode()], ownership.FILE_MODE, entries.TMP
            )
        except OSError:
            pass
