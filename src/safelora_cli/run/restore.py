"""Restore: an adapter's kept original back in place of its projection, and its card section out.

A use case of the flow, not of the store: the store (``stores/backups.py``) finds and checks the
bytes; rewriting the adapter and editing its model card happen here.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

from ..adapters import PROVENANCE_PREFIX, load_adapter, rewrite_lock
from ..adapters.peft_config import ADAPTER_FILE
from ..errors import BackupError, SafeLoraError
from ..io import atomic, ranges, safefs
from ..outputs import card, evaluation
from ..results import Restored
from ..stores.backups import BackupStore
from .binding import require_bound


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
    Safe LoRA section of the adapter's model card goes too (a note says so when it cannot).
    """
    notes: list[str] = []
    with rewrite_lock(directory, on_wait):
        adapter = load_adapter(directory)
        try:
            provenance = adapter.provenance()
            sha = provenance.get(PROVENANCE_PREFIX + "original")
            if not provenance:
                raise BackupError(f"{adapter.file}: carries no safelora provenance; nothing to restore")
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
            st = directory.lstat(ADAPTER_FILE)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise BackupError(
                    f"{adapter.file}: is a symbolic link, and restoring in place would replace the link, not its "
                    "target; replace the link with a copy first"
                )
            with store.open(backup) as original:
                chunks = [ranges.FileRange(original.fileno(), 0, backup.nbytes)]
                atomic.replace(directory, ADAPTER_FILE, chunks, adapter.stat.st_mode & 0o777, expect=adapter.stat)
            try:
                card.remove_card_section(directory)
                evaluation.remove_stale(directory, None)  # it described the projection
            except SafeLoraError as e:
                notes.append(f"model card left as it is: {e}")
        finally:
            adapter.close()
    return Restored(directory.path, backup, notes)
