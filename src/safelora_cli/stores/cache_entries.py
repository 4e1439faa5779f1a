"""The projection cache's files: their names, the ownership rule they follow, what an entry holds
and how it is checked."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import FormatError, SafeLoraError
from ..io import safefs, stfile
from ..projection import OperatorKind
from . import ownership


class CacheRoot(Protocol):
    """What a pair's entries and the ref memo need of the cache they live in (``ProjectionCache``)."""

    @property
    def root(self) -> Path: ...

    def problem(self) -> str | None:
        """Why the cache cannot be used (the ownership rule), or None."""


FORMAT = "3"  # bump when what an entry means changes; old pairs then simply stop matching
META = "safelora.cache."
CHECKSUM = META + "crc32"
TENSOR = "operator"
TMP = ".tmp-"
KINDS: dict[str, OperatorKind] = {"V": "V", "zero": "zero"}
MAX_JSON = 1 << 20  # pair.json and refs/*.json hold a few hundred bytes when safelora wrote them


RULE = ownership.Rule("projection cache not used: ", "SAFELORA_CACHE", "the cache", "what the cache serves")
lstat = ownership.lstat


def hash_key(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


class CorruptEntry(Exception):
    """A cache entry exists but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class Stored:
    """One entry as read and verified: ``data`` views a reused buffer, valid until the next entry."""

    kind: OperatorKind
    data: torch.Tensor
    norm: float
    out_features: int
    in_features: int
    base_key: str = ""  # the checkpoint tensors it was computed from
    aligned_key: str = ""


@dataclass(frozen=True)
class EntrySummary:
    module: str  # "?" when the entry is unreadable
    kind: str
    shape: tuple[int, ...]
    nbytes: int  # the file's size
    problem: str | None


def read_small(path: Path, error: type[SafeLoraError]) -> bytes:
    """A small JSON file of the cache, never through a link, never blocking; ``error`` if it cannot be."""
    with safefs.open_file(path, error, follow=False) as f:
        try:
            data = f.read(MAX_JSON + 1)
        except OSError as e:
            raise error(safefs.os_error(path, e)) from None
    if len(data) > MAX_JSON:
        raise error(f"{path}: more than {MAX_JSON} bytes")
    return data


def checksum(meta: Mapping[str, str], dtype: str, shape: Sequence[int], data: memoryview) -> str:
    """CRC-32 of an entry's metadata (all of it but this checksum), dtype, shape and data.

    The threat is corruption, not forgery (the ownership rule's job), and an entry of hundreds of MB
    is checked on every warm run: zlib's CRC-32 runs at about twice SHA-256's speed.
    """
    fields = sorted((k, v) for k, v in meta.items() if k != CHECKSUM)
    described = json.dumps([fields, dtype, list(shape)], separators=(",", ":"), ensure_ascii=True)
    return f"{zlib.crc32(data, zlib.crc32(described.encode('ascii'))):08x}"


def memory(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes without a copy (valid while ``t`` lives): an operator is up to
    hundreds of megabytes, and copying it to ``bytes`` first cost more than writing it."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def check_meta(header: stfile.Header, module: str, transpose: bool) -> tuple[OperatorKind, float, int, int]:
    """An entry's kind, ‖V‖, out and in, after checking they describe ``module``'s tensor."""
    meta = header.metadata
    entry = header.tensors.get(TENSOR)
    try:
        kind = KINDS[meta[META + "kind"]]
        norm, out, inp = float(meta[META + "norm"]), int(meta[META + "out"]), int(meta[META + "in"])
        same = (meta[META + "module"], meta[META + "transpose"]) == (module, str(int(transpose)))
    except (KeyError, ValueError):
        raise FormatError("metadata is missing or malformed") from None
    if CHECKSUM not in meta:
        raise FormatError("metadata is missing or malformed")
    if meta.get(META + "format") != FORMAT or not same:
        raise FormatError("it belongs to another module or format")
    shape = {"V": (out, inp), "zero": (0, 0)}[kind]
    if entry is None or entry.dtype != "F32" or entry.shape != shape or len(header.tensors) != 1:
        raise FormatError(f"expected one F32 tensor of shape {list(shape)}")
    if not (norm > 0 if kind != "zero" else norm == 0) or norm == float("inf"):
        raise FormatError(f"invalid norm {norm!r}")
    return kind, norm, out, inp


def entry_summary(path: Path) -> EntrySummary:
    """One entry as its header describes it; a link or other non-regular file is named, never opened."""
    try:
        st = lstat(path)
    except OSError as e:
        return EntrySummary("?", "?", (), 0, safefs.os_error(path, e))
    if st is None:
        return EntrySummary("?", "?", (), 0, "removed while listed")
    if not stat.S_ISREG(st.st_mode):
        return EntrySummary("?", "?", (), 0, f"{path}: is {safefs.kind(st.st_mode)}, not a regular file")
    try:
        with safefs.open_file(path, FormatError, follow=False) as f:
            header = stfile.header_of(f, str(path), os.fstat(f.fileno()).st_size)
        meta, op = header.metadata, header.tensors[TENSOR]
        return EntrySummary(meta[META + "module"], meta[META + "kind"], op.shape, st.st_size, None)
    except FormatError as e:
        return EntrySummary("?", "?", (), st.st_size, str(e))
    except (OSError, KeyError):
        return EntrySummary("?", "?", (), st.st_size, "unreadable")
