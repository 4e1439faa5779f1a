"""A backup belongs to what it produced: the checks ``restore`` and a re-projection make before
using a kept original for an adapter.

A kept original's record lists the stamp digests of the results safelora wrote from it
(``Backup.results``). An adapter may be put back to (or projected again from) that original only
when its current stamp digest, recomputed from its contents, is one of them: a stamp that merely
names another adapter's backup gets nothing. With ``force`` (an adapter edited since), the
original's lora_A tensors (as the adapter's format reads them) and module shapes must still be
the adapter's: projection changes lora_B only.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters import Adapter
from ..adapters.digest import file_digest
from ..errors import BackupError, ChangedSinceError, SafeLoraError
from ..results import Backup
from ..stores.backups import BackupStore


def bound(adapter: Adapter, backup: Backup) -> bool:
    """Whether safelora wrote ``adapter`` as it is now from ``backup``."""
    try:
        return file_digest(adapter) in backup.results
    except SafeLoraError:
        return False


def require_bound(adapter: Adapter, backup: Backup, store: BackupStore, force: bool, doing: str) -> None:
    """Refuse (one line) to use ``backup`` for ``adapter`` unless it produced it, or, with ``force``,
    unless its lora_A tensors and module shapes are the adapter's. ``doing``: what would be done."""
    if bound(adapter, backup):
        return
    if not force:
        raise ChangedSinceError(
            f"{adapter.file}: is not what safelora wrote from its original (backup {backup.sha256[:12]}): changed "
            f"since, or its stamp names another adapter's backup; {doing} would throw it away"
        )
    if not _same_lora_a(adapter, backup, store):
        raise BackupError(
            f"{adapter.file}: the backup its stamp names ({backup.sha256[:12]}) has other lora_A tensors or module "
            "shapes: it is not this adapter's original, and forcing cannot make it one; project the adapter "
            "from its own original"
        )


def _same_lora_a(adapter: Adapter, backup: Backup, store: BackupStore) -> bool:
    """Whether the kept original has the adapter's modules, shapes and stored types, and its lora_A
    tensors as the adapter's format reads them (a quantized type dequantized, a transposed one turned)."""
    handle = store.open(backup)
    try:
        try:
            header, modules, _, _ = adapter.format.weights(handle, backup.path, adapter.config)
        except SafeLoraError:
            return False
        original = replace(adapter, header=header, handle=handle, modules=modules, source=backup.path)
        mine = {m.module: m for m in adapter.modules}
        theirs = {m.module: m for m in modules}
        if mine.keys() != theirs.keys():
            return False
        for name, m in mine.items():
            o = theirs[name]
            ours_a, ours_b = adapter.header.tensors[m.a_key], adapter.header.tensors[m.b_key]
            their_a, their_b = header.tensors[o.a_key], header.tensors[o.b_key]
            if (ours_a.shape, ours_b.shape, ours_a.dtype) != (their_a.shape, their_b.shape, their_a.dtype):
                return False
            if not torch.equal(adapter.tensor(m.a_key), original.tensor(o.a_key)):
                return False
        return True
    finally:
        handle.close()
