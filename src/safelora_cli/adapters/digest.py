"""The content digest safelora stamps and checks: the tensors themselves, not how the file lays them out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from ..errors import AdapterError
from ..io import ranges, safefs, stfile
from .base import Adapter


def digest(blobs: Mapping[str, stfile.Blob]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(blobs):
        b = blobs[name]
        h.update(f"{name}\0{b.dtype}\0{list(b.shape)}\0{len(b.data)}\n".encode())
        for piece in ranges.pieces(b.data):
            h.update(piece)
    return h.hexdigest()


def file_digest(adapter: Adapter) -> str:
    """``digest`` of the adapter file as it is on disk (read a chunk at a time)."""
    try:
        return digest(blobs(adapter, {}))
    except OSError as e:
        raise AdapterError(safefs.os_error(adapter.file, e)) from None


def blobs(adapter: Adapter, replacements: Mapping[str, torch.Tensor]) -> dict[str, stfile.Blob]:
    """Every tensor in file order: replacements as bytes, the others as ranges of the open file."""
    fd = adapter.handle.fileno()
    out: dict[str, stfile.Blob] = {}
    for name, e in sorted(adapter.header.tensors.items(), key=lambda kv: kv[1].start):
        new = replacements.get(name)
        data = ranges.FileRange(fd, e.start, e.end) if new is None else stfile.tensor_bytes(new)
        out[name] = stfile.Blob(e.dtype, e.shape, data)
    return out
