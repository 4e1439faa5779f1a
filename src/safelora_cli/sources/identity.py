"""Content identity: a checkpoint is what safelora reads from it, a digest per tensor it uses.

Each tensor's digest is BLAKE3 over its dtype, shape and bytes, so the same weights give the same
digest from a local directory, a copy of it, a Hugging Face cache snapshot or the Hub repo at that
commit, whatever their paths, inodes and times. A checkpoint's identity is the map of the tensors
a run used (name → digest) and one digest over that map (``combined``).

BLAKE3 rather than SHA-256: it reads about twice as fast on one core, so hashing the bytes a run
already streams stays well inside the time the run spends on them (see ``run/stages.py``: it
runs on a thread of its own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
from blake3 import blake3

from ..io import strict

DIGEST_LENGTH = 64  # hex characters: all 256 bits


def tensor_digest(t: torch.Tensor) -> str:
    """BLAKE3 of a tensor's dtype, shape and bytes (little-endian, row-major: as safetensors stores them)."""
    dtype = str(t.dtype).removeprefix("torch.")
    h = blake3(f"safelora-tensor\0{dtype}\0{','.join(map(str, t.shape))}\0".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


def combined(tensors: Mapping[str, str]) -> str:
    """One digest over a map of tensor digests (sorted by name)."""
    doc = json.dumps(sorted(tensors.items()), separators=(",", ":"), ensure_ascii=True)
    return blake3(b"safelora-tensors\0" + doc.encode("ascii")).hexdigest()


def is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == DIGEST_LENGTH and all(c in "0123456789abcdef" for c in value)


def parse_map(raw: str | None) -> dict[str, str] | None:
    """A recorded map (JSON object: tensor name → digest), or None when it is missing or malformed."""
    if raw is None:
        return None
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON:
        return None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and is_digest(v) for k, v in doc.items()):
        return None
    return doc


def dump_map(tensors: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(tensors.items())), separators=(",", ":"), ensure_ascii=True)


def wanted(names: Sequence[str], known: Mapping[str, str]) -> list[str]:
    """The names in ``names`` whose digest is not known yet, once each, in order."""
    return [n for n in dict.fromkeys(names) if n not in known]
