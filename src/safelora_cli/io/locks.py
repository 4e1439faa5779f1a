"""The one lock helper: an exclusive flock(2) on a descriptor, for every lock safelora takes.

flock, not a lock file's existence: the kernel releases it when the holder dies, even by SIGKILL,
so no run ever waits on a lock a killed run left. Locks are taken on descriptors safelora opened
itself (a directory's, or a lock file opened without following a link): path-based lock libraries
open by name, and would follow a link planted where the lock file should be.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .safefs import kind


def acquire(fd: int, on_wait: Callable[[], None] | None) -> None:
    """Take the exclusive lock on ``fd``: at once when it is free.

    When another process holds it: with ``on_wait`` None, ``BlockingIOError`` (nothing waits);
    otherwise ``on_wait()`` is called, then this waits for the lock.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait is None:
            raise
        on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)


def release(fd: int) -> None:
    """Let go of the lock on ``fd``, which stays open (closing a descriptor also releases its lock)."""
    fcntl.flock(fd, fcntl.LOCK_UN)


def open_file(path: Path, mode: int) -> int:
    """Open (or create, with ``mode``) a lock file. Anything but a regular file is refused (EINVAL)
    before it is opened, and a link is never followed (ELOOP): such a lock no run can hold."""
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return fd
        os.close(fd)
    raise OSError(errno.EINVAL, f"{path.name} is {kind(st.st_mode)}, not a regular file")


def hold_file(path: Path, mode: int, on_wait: Callable[[], None], make_dir: Callable[[Path], None]) -> int:
    """The lock of the lock file ``path`` (``open_file``); returns its descriptor: closing it releases the lock.

    ``make_dir`` creates ``path``'s directory as the caller's store makes directories (modes, owner).
    A lock file removed while this waited (its directory deleted) is opened again and locked anew:
    holding a file no longer at ``path`` would exclude no one. ``on_wait`` is called once at most.
    """
    waited = False

    def wait_once() -> None:
        nonlocal waited
        if not waited:
            on_wait()
            waited = True

    while True:
        make_dir(path.parent)
        fd = open_file(path, mode)
        try:
            acquire(fd, wait_once)
            if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def file_held(path: Path, mode: int, make_dir: Callable[[Path], None]) -> Iterator[None]:
    """``hold_file`` while the block runs, waiting quietly for another holder."""
    fd = hold_file(path, mode, lambda: None, make_dir)
    try:
        yield
    finally:
        os.close(fd)
