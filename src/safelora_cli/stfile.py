"""A strict safetensors reader and writer that works on byte ranges.

We parse headers ourselves (rather than through ``safe_open``) for three reasons: the same parser
serves local files and ranged Hub reads, reading a tensor with ``readinto`` into a reused buffer
avoids a fresh allocation per tensor, and the writer can copy untouched tensors byte for byte.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from . import safefs
from .errors import FormatError

# Large enough for any real checkpoint header (a 405B index has ~100 kB per shard), small enough
# that a corrupt length cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# What every format error ends with: the same parser reads adapters, checkpoints and cache entries.
CORRUPT = "the file is corrupt; download, copy or save it again"
TRUNCATED = "the file is truncated; download, copy or save it again"


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
    if n > MAX_HEADER_BYTES or (file_size is not None and 8 + n > file_size):
        raise FormatError(f"{where}: header length {n} is larger than the file; not safetensors, or {TRUNCATED}")
    return int(n)


def parse_header(raw: bytes, where: str, file_size: int | None) -> Header:
    """Validate a header's JSON (``raw`` excludes the 8-byte length) against the file's size."""
    data_start = 8 + len(raw)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{where}: header is not valid JSON ({e.__class__.__name__}); {CORRUPT}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: header is not a JSON object; {CORRUPT}")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{where}: __metadata__ must map strings to strings; {CORRUPT}")
    tensors: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        tensors[name] = _entry(name, info, where, data_start)
    data_size = None if file_size is None else file_size - data_start
    _check_layout(tensors.values(), where, data_size, data_start)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _entry(name: str, info: object, where: str, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise FormatError(f"{where}: tensor {name!r} has no dtype/shape/data_offsets entry; {CORRUPT}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in DTYPES):
        raise FormatError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}; save it as {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}; {CORRUPT}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise FormatError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}; {CORRUPT}")
    itemsize = DTYPES[dtype].itemsize
    expected = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != expected:
        raise FormatError(
            f"{where}: tensor {name!r} is {dtype}{shape} ({expected} bytes) but its data_offsets "
            f"span {offsets[1] - offsets[0]} bytes; {CORRUPT}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(entries: Iterable[TensorEntry], where: str, data_size: int | None, data_start: int) -> None:
    end = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        rel_start, rel_end = e.start - data_start, e.end - data_start
        if rel_start < end:
            raise FormatError(f"{where}: tensor {e.name!r} overlaps another tensor; {CORRUPT}")
        if data_size is not None and rel_end > data_size:
            raise FormatError(
                f"{where}: tensor {e.name!r} ends at byte {e.end} beyond the end of the file; {TRUNCATED}"
            )
        end = max(end, rel_end)


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


_COPY_CHUNK = 8 << 20
_zeros: memoryview | None = None


def _zero_chunk(n: int) -> memoryview:
    """``n`` (≤ 8 MiB) zero bytes from one shared buffer: holes of sparse files are hashed from it."""
    global _zeros
    if _zeros is None:
        _zeros = memoryview(bytes(_COPY_CHUNK))
    return _zeros[:n]


@dataclass(frozen=True)
class FileRange:
    """Bytes ``start:end`` of an open file: copied or hashed a chunk at a time, never held whole.

    Holes of a sparse file are found with SEEK_DATA/SEEK_HOLE: they are hashed from a buffer of
    zeros and copied as holes, so a file whose size is mostly holes costs neither reads nor disk.
    """

    fd: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def segments(self) -> Iterator[tuple[int, int, bool]]:
        """``(start, end, is_hole)`` runs covering the range (one data run where holes are unknown)."""
        pos = self.start
        while pos < self.end:
            try:
                data = min(os.lseek(self.fd, pos, os.SEEK_DATA), self.end)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                    yield pos, self.end, False
                    return
                data = self.end
            if data > pos:
                yield pos, data, True
                pos = data
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), self.end)
            yield pos, hole, False
            pos = hole

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The range in chunks of at most 8 MiB (``os.pread``: the file position does not matter)."""
        for start, end, hole in self.segments():
            pos = start
            while pos < end:
                n = min(_COPY_CHUNK, end - pos)
                chunk: bytes | memoryview = _zero_chunk(n) if hole else os.pread(self.fd, n, pos)
                if not chunk:
                    raise OSError(errno.EIO, "the file is shorter than its header says")
                pos += len(chunk)
                yield chunk


Data = bytes | memoryview | FileRange


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


def pieces(data: Data) -> Iterator[bytes | memoryview]:
    """``data`` as buffers: itself, or a file range's chunks."""
    if isinstance(data, FileRange):
        yield from data.chunks()
    else:
        yield data


def write_chunks(fd: int, chunks: Iterable[Data]) -> None:
    """Write every chunk at the file position of ``fd`` (a new, empty file).

    A file range's data is copied in the kernel where it can be, and its holes stay holes.
    """
    for chunk in chunks:
        if not isinstance(chunk, FileRange):
            _write_all(fd, chunk)
            continue
        for start, end, hole in chunk.segments():
            if hole:
                os.lseek(fd, end - start, os.SEEK_CUR)
            elif not _copy_range(chunk.fd, start, end, fd):
                for piece in FileRange(chunk.fd, start, end).chunks():
                    _write_all(fd, piece)
    # A file that ends in a hole has its size set by the last seek, which writes nothing.
    os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, start: int, end: int, fd: int) -> bool:
    """``copy_file_range``: no trip through user space. False (nothing copied) where the kernel or
    the filesystems cannot, so the caller copies through a buffer instead."""
    pos = start
    try:
        while pos < end:
            n = os.copy_file_range(src, fd, end - pos, pos)
            if n == 0:
                raise OSError(errno.EIO, "the file is shorter than its header says")
            pos += n
    except OSError as e:
        if pos == start and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True


def fsync(target: Path | int) -> None:
    """Flush a file, or a directory's entries (a rename inside it), to disk: by path, or an open descriptor."""
    if isinstance(target, int):
        os.fsync(target)
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
