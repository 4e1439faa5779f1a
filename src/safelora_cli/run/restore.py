"""Restore: an adapter's kept original back in place of its projection, and its card section out.

A use case of the flow, not of the store: the store (``stores/backups.py``) finds and checks the
bytes; rewriting the adapter and editing its model card happen here.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable

from ..adapters import PROVENANCE_PREFIX, Adapter, load_adapter, rewrite_lock
from ..errors import BackupError, SafeLoraError
from ..io import atomic, ranges, safefs
from ..outputs import card, evaluation
from ..results import Backup, Restored
from ..stores.backups import BackupStore
from .binding import require_bound
from .signed import unsign


def restore(
    directory: safefs.Directory, store: BackupStore, *, force: bool = False, on_wait: Callable[[], None] = lambda: None
) -> Restored:
    """Put an adapter's kept original back, byte for byte, in place of its projection.

    The same locked, descriptor-based, atomic rewrite as ``project``: the adapter ends as the
    projection or as the original, never a mix. Refused (``BackupError``) when the adapter carries
    no provenance or names no backup, when the store does not hold it, and when the backup did not
    produce the adapter as it is now (``binding``: changed since, or a stamp naming another adapter's
    backup); with ``force``, an adapter changed since is restored if the backup's lora_A tensors and
    module shapes are still its own. The
    Safe LoRA section of the adapter's model card goes too, and so does its signed attestation (a note
    says so when either cannot).
    """
    notes: list[str] = []
    with rewrite_lock(directory, on_wait):
        adapter = load_adapter(directory)
        try:
            provenance = adapter.provenance()
            sha = provenance.get(PROVENANCE_PREFIX + "original")
            if not provenance:
                kept = _kept_as_it_is(adapter, store)
                if kept is None:
                    raise BackupError(f"{adapter.file}: carries no safelora provenance; nothing to restore")
                note = f"already the original safelora kept for it (sha256 {kept.sha256[:12]}…): nothing to restore"
                return Restored(directory.path, kept, [note], unchanged=True)
            if sha is None:
                raise BackupError(
                    f"{adapter.file}: projected without a backup of its original (with backups off, or by a "
                    f"safelora from before backups); there is nothing in {store.root} to restore it from"
                )
            backup = store.find(sha)
            if backup is None:
                raise BackupError(
                    f"{adapter.file}: its original (sha256 {sha[:12]}…) is not in the backup store {store.root}; it "
                    "was removed, or kept under another SAFELORA_BACKUPS"
                )
            require_bound(adapter, backup, store, force, "restoring")
            [name] = adapter.format.kept_files(adapter)
            st = directory.lstat(name)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise BackupError(
                    f"{adapter.file}: is a symbolic link, and restoring in place would replace the link, not its "
                    "target; replace the link with a copy first"
                )
            with store.open(backup) as original:
                chunks = [ranges.FileRange(original.fileno(), 0, backup.nbytes)]
                atomic.replace(directory, name, chunks, adapter.stat.st_mode & 0o777, expect=adapter.stat)
            try:
                unsign(adapter)  # it described the projection
            except SafeLoraError as e:
                notes.append(f"attestation left in place, and it no longer matches: {e}")
            try:
                card.remove_card_section(directory)
                evaluation.remove_stale(directory, None)  # it described the projection
            except SafeLoraError as e:
                notes.append(f"model card left as it is: {e}")
        finally:
            adapter.close()
    return Restored(adapter.path, backup, notes)


def _kept_as_it_is(adapter: Adapter, store: BackupStore) -> Backup | None:
    """The backup kept from this adapter directory that it already is, byte for byte (restored
    before, or never changed since), or None. Hashed only when the store holds an original of its
    size taken from this directory."""
    size = adapter.stat.st_size
    candidates = [b for b in store.all() if b.nbytes == size and any(_same_dir(a, adapter) for a in b.adapters)]
    if not candidates:
        return None
    h = hashlib.sha256()
    for chunk in ranges.FileRange(adapter.handle.fileno(), 0, size).chunks():
        h.update(chunk)
    return next((b for b in candidates if b.sha256 == h.hexdigest()), None)


def _same_dir(recorded: str, adapter: Adapter) -> bool:
    try:
        st = os.stat(recorded)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == adapter.dir.identity
