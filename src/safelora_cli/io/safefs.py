"""Opening other people's files: one name, one object, checked before a byte is read.

Every file safelora reads may be an attacker's. So a file is opened without blocking (opening a
FIFO for reading would otherwise wait forever for a writer) and, before anything is read, ``fstat``
of the open descriptor must show a regular file: FIFOs, sockets and devices are refused with one
line. A directory is opened once, as a descriptor, and the files in it are reached through that
descriptor (the ``*at`` calls), so a symlink re-pointed anywhere in its path mid-run cannot redirect
a later read or write. OS errors (name too long, permission denied, symlink loops) become one line
that names the path.
"""

from __future__ import annotations

import fcntl
import os
import stat
from io import BufferedReader
from pathlib import Path
from types import TracebackType

from ..errors import SafeLoraError

_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind(mode: int) -> str:
    """What a non-regular file is, for messages: ``a FIFO``, ``a directory``…"""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def os_error(where: object, e: OSError) -> str:
    """One line for an OS error on ``where``: the path, then what the OS said."""
    return f"{where}: {e.strerror or e.__class__.__name__}"


def _not_regular(where: object, mode: int, fix: str) -> str:
    return f"{where}: is {kind(mode)}, not a regular file; {fix}"


def open_file(
    path: str | Path,
    error: type[SafeLoraError],
    *,
    dir_fd: int | None = None,
    where: object = None,
    fix: str = "replace it with a regular file",
    follow: bool = True,
) -> BufferedReader:
    """Open a regular file for reading; anything else raises ``error`` with one line.

    ``path`` is relative to ``dir_fd`` when given. ``where`` is how messages name the file (default:
    ``path``). ``follow=False`` refuses a symbolic link at the last component.
    """
    where = path if where is None else where
    nofollow = 0 if follow else os.O_NOFOLLOW
    try:
        # stat first, so a device is never opened (opening some has side effects); fstat below is
        # what counts, since the name may be swapped between the two calls.
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
        if not stat.S_ISREG(st.st_mode):
            raise error(_not_regular(where, st.st_mode, fix))
        fd = os.open(path, _READ | nofollow, dir_fd=dir_fd)
    except OSError as e:
        raise error(os_error(where, e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(_not_regular(where, st.st_mode, fix))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(
    path: str | Path,
    error: type[SafeLoraError],
    limit: int,
    *,
    dir_fd: int | None = None,
    where: object = None,
    fix: str = "replace it with a regular file",
    follow: bool = True,
) -> tuple[bytes, os.stat_result]:
    """The whole content of a small regular file (a JSON config or index, a model card) and the
    ``fstat`` of the file read (``follow=False`` refuses a symbolic link, as ``open_file``).

    A file larger than ``limit`` is refused before it is read.
    """
    where = path if where is None else where
    with open_file(path, error, dir_fd=dir_fd, where=where, fix=fix, follow=follow) as f:
        try:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                raise error(f"{where}: {st.st_size} bytes, more than the {limit} such a file may have; {fix}")
            data = f.read(limit + 1)
        except OSError as e:
            raise error(os_error(where, e)) from None
    if len(data) > limit:
        raise error(f"{where}: more than the {limit} bytes such a file may have; {fix}")
    return data, st


class Directory:
    """A directory opened once; its files are opened, listed and renamed through the descriptor."""

    def __init__(
        self, path: Path, error: type[SafeLoraError], *, fix: str = "pass a directory", fd: int | None = None
    ) -> None:
        """Open ``path`` (following links once, as the user named it), or adopt an open ``fd``."""
        self.fd = -1
        self.path = path
        self.error = error
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except NotADirectoryError:
                raise error(f"{path}: is not a directory; {fix}") from None
            except FileNotFoundError:
                raise error(f"{path}: does not exist; {fix}") from None
            except OSError as e:
                raise error(os_error(path, e)) from None
        self.fd = fd
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)

    def open(self, name: str, *, fix: str = "replace it with a regular file", follow: bool = True) -> BufferedReader:
        return open_file(name, self.error, dir_fd=self.fd, where=self.path / name, fix=fix, follow=follow)

    def read_small(
        self, name: str, limit: int, *, fix: str = "replace it with a regular file", follow: bool = True
    ) -> tuple[bytes, os.stat_result]:
        return read_small(name, self.error, limit, dir_fd=self.fd, where=self.path / name, fix=fix, follow=follow)

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry ``name`` itself (a link is not followed); None when there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self.error(os_error(self.path / name, e)) from None

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.fd))
        except OSError as e:
            raise self.error(os_error(self.path, e)) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Directory:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
