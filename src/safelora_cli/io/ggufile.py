"""A strict GGUF reader and header writer that works on byte ranges (GGUF versions 2 and 3).

The ``gguf`` package's ``GGUFReader`` maps the whole file and trusts the counts in its header: a
crafted file claiming 2^63 tensors, or a string of 2^63 bytes, sends it looping or allocating. This
reader checks every count and length against the bytes the file (and ``MAX_HEADER_BYTES``) can
hold before it reads anything, reads the header in small reads, and never touches tensor data:
tensors are ranges of the open file, copied through untouched when a file is rewritten.

It keeps each key/value pair and each tensor description as its raw bytes, so a rewrite puts back
every one it does not change byte for byte, and only the data section's start moves.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import FormatError
from .ranges import Data, FileRange

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_HEADER_BYTES = 64 << 20  # key/value pairs and tensor descriptions; tensor data is not counted
MAX_KEY_BYTES = 65535  # what the GGUF specification allows a key
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1: llama.cpp refuses longer tensor names
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 62

CORRUPT = "the file is corrupt or crafted; convert or download it again"
TRUNCATED = "the file is truncated; convert, copy or download it again"

# Value types: (struct format, size) for the fixed-size ones; 8 is a string, 9 an array.
STRING, ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
UINT32 = 4


@dataclass(frozen=True)
class KeyValue:
    """One metadata pair: its key, value type, decoded value (scalars and strings; None for an array)
    and the raw bytes it occupies in the file (key included)."""

    key: str
    vtype: int
    value: object
    raw: bytes


@dataclass(frozen=True)
class TensorInfo:
    """One tensor description: its name, dims (GGML order: the fastest-varying first), GGML type,
    offset from the data section's start, and its raw bytes."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int
    raw: bytes


@dataclass(frozen=True)
class Layout:
    """A parsed GGUF header: where everything is, and the bytes to write it back."""

    version: int
    kvs: tuple[KeyValue, ...]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_start: int
    file_size: int

    def value(self, key: str) -> object:
        """The decoded value of ``key`` (None when absent, or an array)."""
        for kv in self.kvs:
            if kv.key == key:
                return kv.value
        return None


class _Cursor:
    """Small reads from the start of a file, each checked against the file's size and the header cap."""

    def __init__(self, f: BinaryIO, size: int, where: str) -> None:
        self.f, self.size, self.where, self.pos = f, size, where, 0

    def left(self) -> int:
        return min(self.size, MAX_HEADER_BYTES) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise FormatError(f"{self.where}: {what} runs past the end of the file; {TRUNCATED}")
        if n > self.left():
            raise FormatError(f"{self.where}: {what} makes the header larger than {MAX_HEADER_BYTES} bytes; {CORRUPT}")
        data = self.f.read(n)
        if len(data) != n:
            raise FormatError(f"{self.where}: {what} runs past the end of the file; {TRUNCATED}")
        self.pos += n
        return data

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str, limit: int) -> bytes:
        n = self.u64(f"{what}'s length")
        if n > limit:
            raise FormatError(f"{self.where}: {what} claims {n} bytes, over the {limit} allowed; {CORRUPT}")
        if n > self.left():
            raise FormatError(f"{self.where}: {what} claims {n} bytes, more than the file holds; {CORRUPT}")
        return self.take(n, what)


def _text(raw: bytes, where: str, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: {what} is not UTF-8; {CORRUPT}") from None


def _value(c: _Cursor, vtype: int, what: str, nested: bool) -> object:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, c.take(size, what))[0]
    if vtype == STRING:
        return _text(c.string(what, MAX_HEADER_BYTES), c.where, what)
    if vtype == ARRAY:
        if nested:
            raise FormatError(f"{c.where}: {what} is an array of arrays, which GGUF readers refuse; {CORRUPT}")
        etype = c.u32(f"{what}'s element type")
        count = c.u64(f"{what}'s length")
        least = _SCALARS[etype][1] if etype in _SCALARS else 8
        if etype not in _SCALARS and etype not in (STRING, ARRAY):
            raise FormatError(f"{c.where}: {what} has elements of unknown type {etype}; {CORRUPT}")
        if count * least > c.left():
            raise FormatError(f"{c.where}: {what} claims {count} elements, more than the file holds; {CORRUPT}")
        if etype in _SCALARS:
            c.take(count * least, what)
        else:
            for _ in range(count):
                _value(c, etype, what, nested=True)
        return None
    raise FormatError(f"{c.where}: {what} has unknown value type {vtype}; {CORRUPT}")


def read_layout(f: BinaryIO, size: int, where: str, type_sizes: Mapping[int, tuple[int, int]]) -> Layout:
    """Parse and check the header of the GGUF file ``f`` (``size`` bytes), named ``where`` in messages.

    ``type_sizes`` gives each GGML type's (block size, bytes per block); a tensor of a type not in it
    is refused. Every count and length is checked before it is used, offsets must be aligned and
    every tensor's data must lie in the file without overlapping another's; names and keys must be
    unique. Raises ``FormatError`` (one line) for anything else.
    """
    f.seek(0)
    c = _Cursor(f, size, where)
    if size < 4 or c.take(4, "the magic") != MAGIC:
        raise FormatError(f"{where}: not a GGUF file (no GGUF magic at its start); pass a GGUF LoRA file")
    version = c.u32("the version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        why = "a big-endian file" if swapped in VERSIONS else f"version {version}"
        raise FormatError(f"{where}: GGUF {why}, and safelora reads little-endian GGUF versions 2 and 3; {CORRUPT}")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the key/value count")
    # A pair takes at least 8 (key length) + 1 + 4 (type) + 1 bytes, a tensor description 8 + 1 + 4 + 4 + 8.
    if n_kv * 14 > c.left():
        raise FormatError(f"{where}: claims {n_kv} key/value pairs, more than the file can hold; {CORRUPT}")
    if n_tensors * 25 > c.left():
        raise FormatError(f"{where}: claims {n_tensors} tensors, more than the file can hold; {CORRUPT}")
    kvs: list[KeyValue] = []
    keys: set[str] = set()
    for i in range(n_kv):
        start = c.pos
        key = _text(c.string(f"key {i}", MAX_KEY_BYTES), where, f"key {i}")
        if key in keys:
            raise FormatError(f"{where}: key {key!r} appears twice; {CORRUPT}")
        keys.add(key)
        vtype = c.u32(f"{key}'s type")
        value = _value(c, vtype, key, nested=False)
        kvs.append(KeyValue(key, vtype, value, _raw(f, start, c.pos)))
    alignment = _alignment(kvs, where)
    infos: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        start = c.pos
        name = _text(c.string(f"tensor {i}'s name", MAX_NAME_BYTES), where, f"tensor {i}'s name")
        if name in names:
            raise FormatError(f"{where}: tensor {name!r} appears twice; {CORRUPT}")
        names.add(name)
        n_dims = c.u32(f"{name}'s dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"{where}: tensor {name!r} has {n_dims} dimensions, not 1 to {MAX_DIMS}; {CORRUPT}")
        dims = tuple(c.u64(f"{name}'s dimensions") for _ in range(n_dims))
        ggml_type = c.u32(f"{name}'s type")
        offset = c.u64(f"{name}'s offset")
        nbytes = _nbytes(name, dims, ggml_type, type_sizes, where)
        if offset % alignment:
            raise FormatError(
                f"{where}: tensor {name!r} starts at offset {offset}, not a multiple of {alignment}; {CORRUPT}"
            )
        infos.append(TensorInfo(name, dims, ggml_type, offset, nbytes, _raw(f, start, c.pos)))
    data_start = -(-c.pos // alignment) * alignment
    end = data_start
    for info in sorted(infos, key=lambda t: t.offset):
        begin = data_start + info.offset
        if begin < end:
            raise FormatError(f"{where}: tensor {info.name!r} overlaps the one before it; {CORRUPT}")
        end = begin + info.nbytes
        if end > size:
            raise FormatError(f"{where}: tensor {info.name!r} runs past the end of the file; {TRUNCATED}")
    return Layout(version, tuple(kvs), tuple(infos), alignment, data_start, size)


def _raw(f: BinaryIO, start: int, end: int) -> bytes:
    """The bytes just parsed, read again (a header is small: at most ``MAX_HEADER_BYTES``)."""
    here = f.tell()
    f.seek(start)
    data = f.read(end - start)
    f.seek(here)
    return data


def _alignment(kvs: Sequence[KeyValue], where: str) -> int:
    for kv in kvs:
        if kv.key == ALIGNMENT_KEY:
            a = kv.value
            if kv.vtype != UINT32 or not isinstance(a, int) or a <= 0 or a & (a - 1):
                raise FormatError(f"{where}: {ALIGNMENT_KEY} is not a power of two (u32); {CORRUPT}")
            return a
    return DEFAULT_ALIGNMENT


def _nbytes(name: str, dims: tuple[int, ...], ggml_type: int, sizes: Mapping[int, tuple[int, int]], where: str) -> int:
    if ggml_type not in sizes:
        raise FormatError(
            f"{where}: tensor {name!r} has GGML type {ggml_type}, which safelora does not know; {CORRUPT}"
        )
    block, per_block = sizes[ggml_type]
    count = 1
    for d in dims:
        count *= d
        if count > _MAX_ELEMENTS:
            raise FormatError(f"{where}: tensor {name!r} claims {list(dims)} elements; {CORRUPT}")
    if dims[0] % block:
        raise FormatError(f"{where}: tensor {name!r}'s rows ({dims[0]}) are not whole blocks of {block}; {CORRUPT}")
    return count // block * per_block


def string_kv(key: str, value: str) -> bytes:
    """A string key/value pair as GGUF stores it."""
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", STRING) + struct.pack("<Q", len(v)) + v


def rewrite(fd: int, layout: Layout, kvs: Sequence[bytes], replacements: Mapping[str, bytes]) -> list[Data]:
    """A new file's chunks: ``layout``'s header with ``kvs`` (raw pairs) in place of its pairs, then
    its data section as ranges of ``fd``, with the tensors in ``replacements`` (name → bytes of the
    same length) in place of theirs. Tensor descriptions and every untouched byte are kept."""
    head = bytearray(MAGIC + struct.pack("<IQQ", layout.version, len(layout.tensors), len(kvs)))
    for kv in kvs:
        head += kv
    for info in layout.tensors:
        head += info.raw
    head += bytes(-len(head) % layout.alignment)
    chunks: list[Data] = [bytes(head)]
    pos = layout.data_start
    for info in sorted(layout.tensors, key=lambda t: t.offset):
        new = replacements.get(info.name)
        if new is None:
            continue
        begin = layout.data_start + info.offset
        if len(new) != info.nbytes:
            raise AssertionError(f"replacement for {info.name} changed its size")
        chunks += [FileRange(fd, pos, begin), new]
        pos = begin + info.nbytes
    chunks.append(FileRange(fd, pos, layout.file_size))
    return chunks
