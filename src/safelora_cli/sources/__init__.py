"""Where base and aligned weights come from: one tensor at a time, never a whole model.

``base`` holds what every source shares, ``local`` reads checkpoints on disk, and ``hub`` reads
Hub repos — imported only by runs that use the Hub (huggingface_hub and its HTTP stack cost
~0.25 s to import). ``open_source`` turns what the user typed into one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import HubRepoNotFoundError, HubUnreachableError, SourceError, UsageError
from .base import (
    BIN_INDEX,
    BIN_SINGLE,
    HF_PREFIX,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    Hub,
    HubRef,
    QuietTransfer,
    Source,
    Transfer,
    hf_cache_dir,
    parse_index,
    parse_ref,
)
from .local import SafetensorsSource, TorchBinSource, open_local, open_shard

__all__ = [
    "BIN_INDEX",
    "BIN_SINGLE",
    "HF_PREFIX",
    "SAFETENSORS_INDEX",
    "SAFETENSORS_SINGLE",
    "Hub",
    "HubRef",
    "QuietTransfer",
    "SafetensorsSource",
    "Source",
    "TorchBinSource",
    "Transfer",
    "hf_cache_dir",
    "open_local",
    "open_shard",
    "open_source",
    "parse_index",
    "parse_ref",
]


def open_source(
    spec: str,
    revision: str | None,
    *,
    role: str,
    hub: Hub,
    transfer: Transfer,
    notes: list[str],
    connections: int = 8,
) -> Source:
    """A local checkpoint or a Hub repo, from what the user typed.

    ``hf://org/name`` is always the Hub; an existing local path is always local (as in transformers);
    otherwise ``org/name[@revision]`` is the Hub. The report names which one was used.
    """
    forced = spec.startswith(HF_PREFIX)
    ref = parse_ref(spec.removeprefix(HF_PREFIX))
    if not forced and (ref is None or os.path.lexists(spec)):
        if revision is not None:
            raise UsageError(f"{role} revision {revision}: {spec} is a local path; revisions apply to Hub repos")
        return open_local(Path(spec))
    if ref is None:
        raise SourceError(f"{spec}: not a Hub repo id; write org/name or org/name@revision")
    if ref.revision is not None and revision is not None and ref.revision != revision:
        raise UsageError(f"{role}: revision given twice ({spec}, and revision {revision}); give one")
    # huggingface_hub and its HTTP stack cost ~0.25 s to import: only runs that use the Hub pay it.
    from .hub import open_hub

    try:
        source = open_hub(HubRef(ref.repo_id, ref.revision or revision), hub, transfer, connections)
    except HubRepoNotFoundError as e:
        if forced:
            raise
        # Not a local path, so taken for a Hub id: a typo in a path reads as one, so say both.
        raise HubRepoNotFoundError(f"{e}, nor a local directory of that name") from None
    except HubUnreachableError as e:
        if forced:
            raise
        raise HubUnreachableError(f"{spec}: no such local directory, and on the Hub: {e}") from None
    notes.append(f"{role} {ref.repo_id}@{source.requested} is commit {source.sha}")
    return source
