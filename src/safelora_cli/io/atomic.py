"""Files replaced whole, through a directory's descriptor: readers and crashes see old or new, never a mix.

A temp file is created beside the target through the directory's descriptor (``O_EXCL``,
``O_NOFOLLOW``: never through a link), written, fsync'd and renamed over the target (``renameat``: a
link there is replaced, not followed). Every writer of a file safelora hands back — the adapter,
the files of an ``--output``, the backups of originals, the model card — goes through here.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import AdapterError, InPlaceError
from . import ranges, safefs
from .ranges import Data

TMP_MARK = ".safelora-tmp-"


class Changed(Exception):
    """The file to replace is no longer the one that was read; nothing was written."""


def pause() -> None:
    """Test-only: SAFELORA_TEST_WRITE_DELAY (seconds) stretches each step of a write so that the
    process tests can land SIGKILL, or a re-pointed link, between the steps. Unset, it does nothing."""
    delay = os.environ.get("SAFELORA_TEST_WRITE_DELAY")
    if delay:
        time.sleep(float(delay))


def create_temp(directory: safefs.Directory, name: str) -> tuple[int, str]:
    """A new temp file beside ``name`` (named after it and this process), created through the directory's descriptor."""
    tmp = f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600, dir_fd=directory.fd), tmp


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one file, unchanged between them (inode, size, mtime and ctime)."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def finish(
    directory: safefs.Directory,
    fd: int,
    tmp: str,
    name: str,
    chunks: Sequence[Data],
    mode: int,
    expect: os.stat_result | None = None,
) -> None:
    """Write ``chunks`` to the temp file ``fd``, chmod and fsync it, then rename it over ``name``.

    With ``expect``, the rename happens only if ``name`` is still that very file (``Changed``
    otherwise). Any failure removes the temp file. The directory is not fsync'd: the caller syncs
    it once after its files.
    """
    try:
        try:
            pause()
            ranges.write_chunks(fd, _paused(chunks))
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        pause()
        if expect is not None:
            now = directory.lstat(name)
            if now is None or not same_file(now, expect):
                raise Changed(name)
        os.rename(tmp, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
    except BaseException:
        remove_entry(directory.fd, tmp)
        raise


def write_file(directory: safefs.Directory, name: str, chunks: Sequence[Data], mode: int) -> None:
    """Replace (or create) ``name`` in ``directory`` by a whole, fsync'd file; raises ``OSError``."""
    fd, tmp = create_temp(directory, name)
    finish(directory, fd, tmp, name, chunks, mode)


def replace(
    directory: safefs.Directory,
    name: str,
    chunks: Sequence[Data],
    mode: int = 0o644,
    *,
    expect: os.stat_result | None = None,
) -> None:
    """Replace ``name`` in ``directory`` in place, so that readers and crashes see old or new, never a mix.

    ``finish``, then the directory is fsync'd. With ``expect``, the rename happens only if ``name``
    is still that very file: a file swapped or edited since it was read is never overwritten.
    """
    target = directory.path / name
    try:
        fd, tmp = create_temp(directory, name)
    except OSError as e:
        raise InPlaceError(f"{directory.path}: cannot create a file here ({e.strerror})") from None
    try:
        finish(directory, fd, tmp, name, chunks, mode, expect)
    except Changed:
        raise AdapterError(
            f"{target}: changed on disk while safelora was running; nothing was written. Run again"
        ) from None
    except OSError as e:
        raise InPlaceError(
            f"{target}: write failed ({e.strerror}); the original file is unchanged. Free some space"
        ) from None
    # After the rename the new file is in place: a failure now must not claim the old one survived.
    try:
        ranges.fsync(directory.fd)
    except OSError as e:
        raise AdapterError(
            f"{target}: written, but syncing {directory.path} failed ({e.strerror}); a crash may still undo the write"
        ) from None


def write_unsynced(target: Path, chunks: Sequence[Data], mode: int, prefix: str) -> None:
    """A temp file (named ``prefix``…, mode ``mode``) beside ``target``, then a rename: readers see all
    or nothing. Nothing is fsync'd: for files that carry their own checksum (the projection cache),
    where a torn file is detected and rewritten, and an fsync per file would make a run wait on the disk.
    Raises ``OSError``."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    try:
        try:
            os.fchmod(fd, mode)
            ranges.write_chunks(fd, chunks)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _paused(chunks: Sequence[Data]) -> Iterator[Data]:
    for chunk in chunks:
        yield chunk
        pause()


def remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` (a file, or a directory tree, never following a link) if it exists; best effort."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                for child in os.listdir(fd):
                    remove_entry(fd, child)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def clean_stale(directory: safefs.Directory, prefix: str = "") -> list[str]:
    """Remove the temp files (or directories) killed runs left in ``directory``; returns their names.

    Those whose name starts with ``prefix``: a temp name holds ``TMP_MARK`` and then the pid that
    made it, and those of live processes (a concurrent run) are kept.
    """
    removed = []
    for name in directory.names():
        if not name.startswith(prefix) or TMP_MARK not in name:
            continue
        pid = name.split(TMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        remove_entry(directory.fd, name)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
