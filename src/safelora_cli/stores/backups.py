"""Originals kept before an in-place rewrite: no run destroys the only copy of an adapter.

C·B cannot be undone (C is not invertible), so before an in-place ``project`` replaces
``adapter_model.safetensors`` it copies the file, byte for byte, into a private store, and the
new file's provenance records the original's sha256 (``safelora.original``). ``run/restore.py`` puts
the original back; a later ``project`` with other settings starts from it. The store keeps bytes
and their records; it reads no adapter and edits no model card.

The store (``SAFELORA_BACKUPS``, else ``$XDG_DATA_HOME/safelora/originals``, else
``~/.local/share/safelora/originals``) is never inside the adapter directory (adapter directories
get uploaded: shipping the unsafe original beside the sanitized one would undo the point) nor in
the projection cache (CI systems share that one). It follows the ownership rule, and holds:

    <sha256>.safetensors   an original, byte for byte (holes of a sparse file stay holes), mode 0600
    <sha256>.json          its record: size, each adapter directory it was taken from, with when, and
                           the stamp digests of the results safelora wrote from it (``results``)
    written-<digest>.json  the local record of one adapter safelora wrote on this machine, keyed by
                           the written result's stamp digest: settings, pair, original, time
    .lock                  flock'd while records change
    digests/<key>.json     ``check``'s memo of checkpoint digests by file stat (see ``digests.py``)

The local records are what ``check`` trusts without the original: safelora on this machine wrote
those bytes. They live here, never in the projection cache (CI systems share that one, so anyone
with a runner could plant one there).

A backup is found by the sha256 in the adapter's provenance, and its content is checked against
that sha256 before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BufferedReader
from pathlib import Path

from ..errors import BackupError, BackupNotKeptError
from ..io import atomic, locks, ranges, safefs, strict
from ..results import Backup
from . import ownership
from .digests import DigestMemo

_SHA = re.compile(r"^[0-9a-f]{64}$")
_RECORD_LIMIT = 1 << 20
RULE = ownership.Rule("no backup can be kept: ", "SAFELORA_BACKUPS", "the backup store", "the originals kept there")


def store_root() -> Path:
    """``SAFELORA_BACKUPS``, else ``$XDG_DATA_HOME/safelora/originals``, else ``~/.local/share/safelora/originals``."""
    env = os.environ.get("SAFELORA_BACKUPS")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "safelora" / "originals"


def _record_name(sha: str) -> str:
    return f"{sha}.json"


def _blob_name(sha: str) -> str:
    return f"{sha}.safetensors"


def _written_name(digest: str) -> str:
    return f"written-{digest}.json"


def _store_file(name: str) -> bool | None:
    """How the store uses ``name`` (see ``ownership.Rule.contents``): all of its files are read."""
    return True if name.endswith((".json", ".safetensors")) or name == ".lock" else None


class BackupStore:
    """The store of originals; see the module's docstring."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else store_root()

    def problem(self) -> str | None:
        """Why the store must not be used (the ownership rule), as one line that names the path and the fix."""
        return RULE.checked(lambda: RULE.root(self.root) or RULE.contents(self.root, _store_file), self.root)

    def inside(self, directory: Path) -> bool:
        """Whether the store is ``directory`` or lies under it (links resolved, as far as they exist)."""
        root, there = Path(os.path.realpath(self.root)), Path(os.path.realpath(directory))
        return root.is_relative_to(there)

    def digests(self) -> DigestMemo:
        """``check``'s own memo of checkpoint digests (``digests/``): private, never the shared cache's."""
        return DigestMemo(self.root, RULE, self.problem())

    def _usable(self, hint: str = "") -> None:
        problem = self.problem()
        if problem is not None:
            raise BackupError(problem + hint)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store's lock, while a record is read and rewritten."""
        with locks.file_held(self.root / ".lock", ownership.FILE_MODE, ownership.mkdirs):
            yield

    # --- keeping an original ---------------------------------------------------------------------

    def save(self, weights: BufferedReader, size: int, adapter_dir: Path) -> Backup:
        """Copy ``size`` bytes of ``weights`` (an adapter file as it was read) into the store, fsync'd,
        and record ``adapter_dir`` for it. A file already kept (same sha256) is not copied again.

        Raises ``BackupError`` when the store cannot be used or written: the caller must not go on.
        """
        problem = self.problem()
        if problem is not None:
            raise BackupNotKeptError(problem)
        try:
            ownership.mkdirs(self.root)
            with safefs.Directory(self.root, BackupError) as store:
                atomic.clean_stale(store)  # what runs killed while keeping an original left
                sha = self._copy(weights, size, store)
                with self._locked():
                    record = self._read_record(sha) or Backup(sha, self.root / _blob_name(sha), size, {})
                    record.adapters[os.path.abspath(adapter_dir)] = time.time()
                    self._write_record(store, record)
                ranges.fsync(store.fd)
        except OSError as e:
            raise BackupNotKeptError(
                f"{safefs.os_error(self.root, e)}: cannot keep the original, so the adapter was not changed; "
                "free some space, fix the store's permissions or point SAFELORA_BACKUPS elsewhere"
            ) from None
        return record

    def _copy(self, weights: BufferedReader, size: int, store: safefs.Directory) -> str:
        """Write the original to a temp file while hashing it; rename it to its sha256 unless kept already."""
        fd, tmp = atomic.create_temp(store, "original")
        h = hashlib.sha256()
        try:
            try:
                # One read: each chunk is hashed and written; a hole is hashed as zeros and skipped.
                for start, end, hole in ranges.FileRange(weights.fileno(), 0, size).segments():
                    for chunk in ranges.FileRange(weights.fileno(), start, end).chunks():
                        h.update(chunk)
                        if not hole:
                            ranges.write_all(fd, chunk)
                    if hole:
                        os.lseek(fd, end - start, os.SEEK_CUR)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            sha = h.hexdigest()
            if _regular_size(store, _blob_name(sha)) == size:
                atomic.remove_entry(store.fd, tmp)  # kept already, by an earlier run on these same bytes
            else:
                os.rename(tmp, _blob_name(sha), src_dir_fd=store.fd, dst_dir_fd=store.fd)
        except BaseException:
            atomic.remove_entry(store.fd, tmp)
            raise
        return sha

    def _read_record(self, sha: str) -> Backup | None:
        try:
            raw, _ = safefs.read_small(self.root / _record_name(sha), BackupError, _RECORD_LIMIT)
            doc = strict.loads(raw)
            adapters = doc["adapters"]
            nbytes = doc["bytes"]
            results = doc.get("results", [])
            if not (isinstance(adapters, dict) and type(nbytes) is int and doc.get("sha256") == sha):
                return None
            kept = {k: float(v) for k, v in adapters.items() if isinstance(k, str) and isinstance(v, (int, float))}
            produced = [d for d in results if isinstance(d, str) and _SHA.match(d)] if isinstance(results, list) else []
        except (BackupError, strict.InvalidJSON, KeyError, TypeError, ValueError):
            return None
        return Backup(sha, self.root / _blob_name(sha), nbytes, kept, produced)

    def _write_record(self, store: safefs.Directory, backup: Backup) -> None:
        doc = {"sha256": backup.sha256, "bytes": backup.nbytes, "adapters": backup.adapters, "results": backup.results}
        atomic.write_file(store, _record_name(backup.sha256), [json.dumps(doc, indent=2).encode()], 0o600)

    # --- finding and using an original --------------------------------------------------------------

    def find(self, sha: str | None) -> Backup | None:
        """The backup whose sha256 is ``sha`` (as provenance records it), or None when none is kept.

        A store that breaks the ownership rule is not looked into: ``BackupError`` says why.
        """
        if sha is None or not _SHA.match(sha):
            return None
        self._usable()
        try:
            with safefs.Directory(self.root, BackupError) as store:
                size = _regular_size(store, _blob_name(sha))
        except (BackupError, OSError):
            return None
        if size is None:
            return None
        record = self._read_record(sha)
        if record is None:
            return Backup(sha, self.root / _blob_name(sha), size, {})
        return Backup(sha, self.root / _blob_name(sha), size, record.adapters, record.results)

    def open(self, backup: Backup) -> BufferedReader:
        """The original, opened and checked against its sha256 (read once, a chunk at a time)."""
        self._usable()
        f = safefs.open_file(backup.path, BackupError, follow=False, fix="the backup store was tampered with")
        try:
            size = os.fstat(f.fileno()).st_size
            h = hashlib.sha256()
            for chunk in ranges.FileRange(f.fileno(), 0, size).chunks():
                h.update(chunk)
        except OSError as e:
            f.close()
            raise BackupError(safefs.os_error(backup.path, e)) from None
        if h.hexdigest() != backup.sha256:
            f.close()
            raise BackupError(
                f"{backup.path}: does not match its sha256 {backup.sha256[:12]}: the backup is corrupt, and the "
                "original cannot be rebuilt from it"
            )
        return f

    # --- listing and removing -----------------------------------------------------------------------

    def all(self) -> list[Backup]:
        """Every backup in the store (oldest first); a store that does not exist yet holds none."""
        if ownership.lstat(self.root) is None:
            return []
        try:
            with safefs.Directory(self.root, BackupError) as store:
                names = store.names()
                found = []
                for name in names:
                    sha = name.removesuffix(".safetensors")
                    if name.endswith(".safetensors") and _SHA.match(sha):
                        size = _regular_size(store, name)
                        if size is not None:
                            record = self._read_record(sha)
                            kept = record.adapters if record else {}
                            found.append(Backup(sha, self.root / name, size, kept, record.results if record else []))
        except OSError as e:
            raise BackupError(safefs.os_error(self.root, e)) from None
        return sorted(found, key=lambda b: (b.created, b.sha256))

    def remove(self, backups: list[Backup]) -> None:
        """Delete these backups: each one is the only copy of an original."""
        with safefs.Directory(self.root, BackupError) as store, self._locked():
            for backup in backups:
                for name in (_blob_name(backup.sha256), _record_name(backup.sha256)):
                    try:
                        os.unlink(name, dir_fd=store.fd)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        raise BackupError(safefs.os_error(self.root / name, e)) from None
            ranges.fsync(store.fd)

    # --- local records of what safelora wrote -------------------------------------------------------

    def record_written(self, digest: str, record: dict[str, object], original: str | None) -> None:
        """Keep the local record of a result whose stamp digest is ``digest`` and, when it was written
        from the kept original ``original``, bind that backup to it (``Backup.results``).

        Raises ``BackupError`` when the store cannot be used or written."""
        if not _SHA.match(digest):
            raise ValueError(f"not a stamp digest: {digest!r}")
        self._usable()
        try:
            ownership.mkdirs(self.root)
            with safefs.Directory(self.root, BackupError) as store, self._locked():
                doc = {"digest": digest, "written": time.time(), **record}
                atomic.write_file(store, _written_name(digest), [json.dumps(doc, indent=2).encode()], 0o600)
                if original is not None:
                    backup = self._read_record(original)
                    if backup is not None and digest not in backup.results:
                        backup.results.append(digest)
                        self._write_record(store, backup)
                ranges.fsync(store.fd)
        except OSError as e:
            raise BackupError(safefs.os_error(self.root, e)) from None

    def written(self, digest: str | None) -> dict[str, object] | None:
        """The local record of the result whose stamp digest is ``digest``, or None. Only this store is
        looked in; a store that breaks the ownership rule is not trusted (None)."""
        if digest is None or not _SHA.match(digest) or self.problem() is not None:
            return None
        try:
            raw, _ = safefs.read_small(self.root / _written_name(digest), BackupError, _RECORD_LIMIT)
            doc = strict.loads(raw)
        except (BackupError, strict.InvalidJSON):
            return None
        return doc if isinstance(doc, dict) and doc.get("digest") == digest else None

    def remove_written(self, older_than: float | None = None) -> int:
        """Delete the local records (those written before ``older_than``, Unix time, when given)."""
        if ownership.lstat(self.root) is None:
            return 0
        gone = 0
        with safefs.Directory(self.root, BackupError) as store, self._locked():
            for name in store.names():
                if not (name.startswith("written-") and name.endswith(".json")):
                    continue
                if older_than is not None:
                    doc = self.written(name.removeprefix("written-").removesuffix(".json"))
                    when = doc.get("written") if doc is not None else None
                    if isinstance(when, (int, float)) and when >= older_than:
                        continue
                try:
                    os.unlink(name, dir_fd=store.fd)
                    gone += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise BackupError(safefs.os_error(self.root / name, e)) from None
            ranges.fsync(store.fd)
        return gone

    def forget(self, backup: Backup, adapter_dir: str) -> None:
        """Drop one adapter directory from a backup that others still use."""
        with safefs.Directory(self.root, BackupError) as store, self._locked():
            record = self._read_record(backup.sha256) or backup
            record.adapters.pop(adapter_dir, None)
            try:
                self._write_record(store, record)
            except OSError as e:
                raise BackupError(safefs.os_error(self.root, e)) from None


def _regular_size(store: safefs.Directory, name: str) -> int | None:
    """The size of ``name`` in the store when it is a regular file (never a link), else None."""
    st = store.lstat(name)
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None
