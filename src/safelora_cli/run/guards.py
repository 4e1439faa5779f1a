"""What a run refuses before it reads a tensor: places it must not write to, whatever else it is told."""

from __future__ import annotations

from collections.abc import Sequence

from ..adapters import Named
from ..adapters.checkpoint import checkpoint_state
from ..errors import BackupError, CheckpointError
from ..results import Settings
from ..stores.backups import BackupStore


def refuse_unsafe_targets(adapters: Sequence[Named], settings: Settings, store: BackupStore) -> None:
    """Raise before any work when the run would write where it must not.

    A Trainer checkpoint is not rewritten in place (``CheckpointError``, exit 2) unless
    ``settings.allow_checkpoint``: resuming from it would continue from projected weights; so is an
    adapter saved under its own name in a checkpoint's subdirectory. The backup
    store must not lie inside an adapter directory or the output (``BackupError``): adapter
    directories get uploaded, and the unsanitized originals would travel with them.
    """
    for named in adapters:
        if named.dir is None:
            continue
        if settings.output is None and not settings.allow_checkpoint:
            state = checkpoint_state(named.dir)
            if state:
                raise CheckpointError(
                    f"{named.path}: a Trainer checkpoint ({', '.join(state)}); rewriting its adapter in place would "
                    "make resuming continue from projected weights; write a projected copy to another directory"
                )
        if store.inside(named.path):
            raise BackupError(
                f"backup store {store.root} lies inside the adapter directory {named.path}, so the unsanitized "
                "originals would travel with the adapter; point SAFELORA_BACKUPS outside it"
            )
    if settings.output is not None and store.inside(settings.output):
        raise BackupError(
            f"backup store {store.root} lies inside the output {settings.output}, so the unsanitized originals "
            "would travel with the adapter; point SAFELORA_BACKUPS outside it"
        )
