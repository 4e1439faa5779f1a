"""A strict safetensors reader and writer that works on byte ranges.

We parse headers ourselves (rather than through ``safe_open``) for three reasons: the same parser
serves local files and ranged Hub reads, reading a tensor with ``readinto`` into a reused buffer
avoids a fresh allocation per tensor, and the writer can copy untouched tensors byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from ..errors import FormatError
from . import safefs, strict
from .ranges import Data

# What the safetensors library itself accepts (its MAX_HEADER_SIZE): a longer header is refused, so
# a corrupt length can never make us allocate more.
MAX_HEADER_BYTES = 100_000_000

# Every dtype safetensors defines, with its size in bits: a file may hold any of them, and tensors
# safelora does not compute on are copied through byte for byte.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# The torch dtype of each safetensors dtype that torch holds one element per element. F4 and the F6
# types have none (torch packs F4 two to a byte, with another shape); a newer type is missing where
# the installed torch predates it.
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in _TORCH_NAMES.items()
    if isinstance(getattr(torch, attr, None), torch.dtype)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The dtypes Safe LoRA computes on; every other one (float8, complex, integer, sub-byte) only passes through.
COMPUTE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# What every format error ends with: the same parser reads adapters, checkpoints and cache entries.
CORRUPT = "the file is corrupt; download, copy or save it again"
TRUNCATED = "the file is truncated; download, copy or save it again"

_U64 = 2**64  # offsets, dimensions, element and bit counts are u64 in the reference reader


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype; a ``FormatError`` for a dtype torch cannot hold element for element (F4, F6_*)."""
        if self.dtype not in DTYPES:
            raise FormatError(
                f"tensor {self.name!r} is {self.dtype}, which torch {torch.__version__} cannot read; safelora "
                f"computes on {', '.join(sorted(COMPUTE_DTYPES))} tensors and copies the others unread"
            )
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors by name, string metadata, and the data section start."""

    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    data_start: int


def header_length(prefix: bytes, where: str, file_size: int | None) -> int:
    """Decode and check the 8-byte little-endian header length."""
    if len(prefix) < 8:
        raise FormatError(f"{where}: file is {len(prefix)} bytes, too short for a safetensors header; {TRUNCATED}")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{where}: header length {n} is over the {MAX_HEADER_BYTES} bytes safetensors allows; not safetensors, "
            f"or {CORRUPT}"
        )
    if file_size is not None and 8 + n > file_size:
        raise FormatError(f"{where}: header length {n} is larger than the file; not safetensors, or {TRUNCATED}")
    return int(n)


def parse_header(raw: bytes, where: str, file_size: int | None) -> Header:
    """Validate a header's JSON (``raw`` excludes the 8-byte length) against the file's size.

    Everything the safetensors library refuses is refused (``FormatError``), and more: duplicate
    tensor names or metadata keys, and what ``strict.loads`` refuses. ``__metadata__: null``, which mlx
    writes for a file without metadata, reads as no metadata, as the library reads it.
    """
    data_start = 8 + len(raw)
    try:
        doc = strict.loads(raw)
    except strict.InvalidJSON as e:
        raise FormatError(f"{where}: header is not valid JSON ({e}); {CORRUPT}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header is not a JSON object; {CORRUPT}")
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings; {CORRUPT}")
    tensors = {name: _entry(name, info, where, data_start) for name, info in doc.items()}
    data_size = None if file_size is None else file_size - data_start
    _check_layout(tensors.values(), where, data_size, data_start)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _entry(name: str, info: object, where: str, data_start: int) -> TensorEntry:
    # Fields other than these three are ignored, as the reference reader ignores them.
    tensor = _tensor(where, name)
    if not isinstance(info, dict):
        raise FormatError(f"{tensor} has no dtype/shape/data_offsets entry; {CORRUPT}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in DTYPE_BITS):
        raise FormatError(f"{tensor} has unsupported dtype {_brief(dtype)}, not one safetensors defines; {CORRUPT}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"{tensor} has an invalid shape {_brief(shape)}; {CORRUPT}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{tensor} has invalid data_offsets {_brief(offsets)}; {CORRUPT}")
    # The element count is folded left to right and refused once it reaches 2**64, exactly as the
    # reference computes it: [2**32, 2**32, 0] overflows there, though its product is 0.
    elements = 1
    for d in shape:
        elements *= d
        if elements >= _U64:
            raise FormatError(f"{tensor} has a shape {_brief(shape)} whose element count overflows; {CORRUPT}")
    bits = elements * DTYPE_BITS[dtype]
    if bits >= _U64:
        raise FormatError(f"{tensor} has a shape {_brief(shape)} whose size overflows; {CORRUPT}")
    if bits % 8:
        raise FormatError(f"{tensor} is {dtype}{_brief(shape)}, {bits} bits, not a whole number of bytes; {CORRUPT}")
    if offsets[1] - offsets[0] != bits // 8:
        raise FormatError(
            f"{tensor} is {dtype}{_brief(shape)} ({bits // 8} bytes) but its data_offsets "
            f"span {offsets[1] - offsets[0]} bytes; {CORRUPT}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _brief(value: object, limit: int = 80) -> str:
    """A header value for a message: its repr, cut short (a hostile shape may hold millions of entries)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _tensor(where: str, name: str) -> str:
    """How messages name a tensor: the file, then the name (cut short only when absurdly long)."""
    return f"{where}: tensor {_brief(name, 300)}"


def _check_layout(entries: Iterable[TensorEntry], where: str, data_size: int | None, data_start: int) -> None:
    """Tensors tile the data section: from its first byte, in offset order, no gap, no overlap, no
    byte after the last one. Bytes no tensor claims could hide a second copy of a tensor."""
    ordered = sorted(entries, key=lambda e: (e.start, e.end))
    if data_size is not None:
        cut = next((e for e in ordered if e.end - data_start > data_size), None)
        if cut is not None:
            raise FormatError(
                f"{_tensor(where, cut.name)} ends at byte {cut.end} beyond the end of the file; {TRUNCATED}"
            )
    end = 0
    for e in ordered:
        rel_start = e.start - data_start
        if rel_start < end:
            raise FormatError(f"{_tensor(where, e.name)} overlaps another tensor; {CORRUPT}")
        if rel_start > end:
            raise FormatError(
                f"{_tensor(where, e.name)} starts at byte {e.start}, leaving {rel_start - end} bytes before it "
                f"that no tensor holds; {CORRUPT}"
            )
        end = e.end - data_start
    if data_size is not None and data_size > end:
        raise FormatError(f"{where}: {data_size - end} bytes after the last tensor that no tensor holds; {CORRUPT}")


def header_of(f: BinaryIO, where: str, size: int) -> Header:
    """Read and validate the header of an open safetensors file of ``size`` bytes, from its start."""
    return parse_header(f.read(header_length(f.read(8), where, size)), where, size)


def read_header(path: Path, fix: str = "pass a safetensors file") -> Header:
    """Read and validate the header of a local safetensors file (a regular file; see ``safefs``)."""
    with safefs.open_file(path, FormatError, fix=fix) as f:
        try:
            return header_of(f, str(path), os.fstat(f.fileno()).st_size)
        except OSError as e:
            raise FormatError(safefs.os_error(path, e)) from None


def tensor_from_bytes(entry: TensorEntry, buf: bytearray | memoryview) -> torch.Tensor:
    """View raw little-endian bytes as the entry's tensor (shares memory with ``buf``)."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(buf, dtype=entry.torch_dtype, count=math.prod(entry.shape)).view(entry.shape)


class Readable(Protocol):
    """A seekable binary file (a local file or a ranged Hub reader)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def read_tensor(f: Readable, entry: TensorEntry, where: str, buf: bytearray | None = None) -> torch.Tensor:
    """Read one tensor from an open file; reuses ``buf`` when it is large enough."""
    if buf is None or len(buf) < entry.nbytes:
        buf = bytearray(entry.nbytes)
    view = memoryview(buf)[: entry.nbytes]
    f.seek(entry.start)
    got = 0
    while got < entry.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise FormatError(f"{where}: tensor {entry.name!r} is cut short; {TRUNCATED}")
        got += n
    return tensor_from_bytes(entry, view)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    out = bytearray(t.numel() * t.element_size())
    if out:
        torch.frombuffer(out, dtype=torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
    return bytes(out)


@dataclass(frozen=True)
class Blob:
    """One tensor to write: its dtype name, shape and raw bytes (in memory, or a range of an open file)."""

    dtype: str
    shape: tuple[int, ...]
    data: Data


def serialize(blobs: Mapping[str, Blob], metadata: Mapping[str, str]) -> list[Data]:
    """Lay out a safetensors file (header padded to 8 bytes, tensors contiguous) as chunks to write."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, b in blobs.items():
        header[name] = {
            "dtype": b.dtype,
            "shape": list(b.shape),
            "data_offsets": [offset, offset + len(b.data)],
        }
        offset += len(b.data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)), raw, *(b.data for b in blobs.values())]
