"""What the formats stored as safetensors (PEFT's, MLX-LM's) share: a tensor read from the open file,
the stamp kept in the header's metadata, and the weights written back with it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import AdapterError
from ..io import atomic, ranges, safefs, stfile
from .base import PROVENANCE_PREFIX, Adapter
from .digest import DIGEST_KEY, STAMP_VERSION, VERSION_KEY, blobs, stamp_digest
from .output import write_output


def read_tensor(adapter: Adapter, key: str) -> torch.Tensor:
    """``key`` as the file stores it, read from the open weights file into memory of its own."""
    entry = adapter.header.tensors[key]
    try:
        data = bytearray(b"".join(ranges.FileRange(adapter.handle.fileno(), entry.start, entry.end).chunks()))
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.source or adapter.file, e)) from None
    return stfile.tensor_from_bytes(entry, data)


def stamp(adapter: Adapter) -> dict[str, str]:
    """The ``safelora.*`` entries of the header's metadata."""
    return {k: v for k, v in adapter.header.metadata.items() if k.startswith(PROVENANCE_PREFIX)}


def write_weights(
    adapter: Adapter,
    replacements: Mapping[str, torch.Tensor],
    provenance: Mapping[str, str],
    output: Path | None,
    *,
    overwrite: bool,
    notes: list[str] | None,
) -> Path:
    """A safetensors adapter's weights (PEFT's, MLX-LM's) written with ``replacements`` (as the format
    encodes them) and the stamp in the header's metadata: in place, atomically, when the file is
    still the one read, or as a complete adapter directory at ``output`` (``write_output``). Every
    other tensor is copied byte for byte; ``notes`` gets what was skipped."""
    tensors = blobs(adapter, replacements)
    metadata = {k: v for k, v in adapter.header.metadata.items() if not k.startswith(PROVENANCE_PREFIX)}
    stamp = {k: v for k, v in provenance.items() if k != DIGEST_KEY} | {VERSION_KEY: STAMP_VERSION}
    metadata.update(stamp)
    # The caller may have computed the digest already (to record it before writing); it is the same.
    metadata[DIGEST_KEY] = provenance.get(DIGEST_KEY) or stamp_digest(adapter, replacements, stamp)
    chunks = stfile.serialize(tensors, metadata)
    mode = adapter.stat.st_mode & 0o777
    if output is not None:
        return write_output(adapter, output, chunks, mode, overwrite, [] if notes is None else notes)
    atomic.replace(adapter.dir, adapter.file.name, chunks, mode, expect=adapter.stat)
    return adapter.file
