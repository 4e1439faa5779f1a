"""Byte ranges of open files, and the writes that copy them: a chunk at a time, holes kept as holes.

The writers of whole files (``atomic``) and the safetensors writer (``stfile.serialize``) hand their
data here as ``Data``: bytes in memory, or a range of a file that is copied, never held whole.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
        """``(start, end, is_hole)`` runs covering the range (one data run where holes are unknown).

        SEEK_DATA and SEEK_HOLE move the file's offset; it is put back before each run is handed
        out, so a reader of the same open file is not disturbed.
        """
        pos = self.start
        while pos < self.end:
            offset = os.lseek(self.fd, 0, os.SEEK_CUR)
            try:
                end, hole = self._run_at(pos)
            finally:
                os.lseek(self.fd, offset, os.SEEK_SET)
            yield pos, end, hole
            pos = end

    def _run_at(self, pos: int) -> tuple[int, bool]:
        """Where the run that starts at ``pos`` ends, and whether it is a hole."""
        try:
            data = os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError as e:
            # ENXIO: no data after pos, the rest is a hole; anything else: the filesystem cannot tell
            return self.end, e.errno == errno.ENXIO
        if data > pos:
            return min(data, self.end), True
        return min(os.lseek(self.fd, pos, os.SEEK_HOLE), self.end), False

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
            write_all(fd, chunk)
            continue
        for start, end, hole in chunk.segments():
            if hole:
                os.lseek(fd, end - start, os.SEEK_CUR)
            elif not _copy_range(chunk.fd, start, end, fd):
                for piece in FileRange(chunk.fd, start, end).chunks():
                    write_all(fd, piece)
    # A file that ends in a hole has its size set by the last seek, which writes nothing.
    os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written."""
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
