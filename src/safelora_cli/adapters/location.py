"""An adapter location opened once, and the lock a rewrite holds on it.

A directory format's location is its directory; a single-file format's (a GGUF LoRA file) is the
directory that holds the file, opened once, with the file's name (``FileLocation``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterError, InPlaceError
from ..io import locks, safefs

if TYPE_CHECKING:
    from .base import Adapter

ENVELOPE = "safelora.intoto.json"  # a directory format's signed attestation (docs/attestations.md)
ENVELOPE_SUFFIX = ".intoto.json"  # every attestation's name ends so: an --output copy never carries one


class FileLocation(safefs.Directory):
    """The directory holding an adapter that is one file, and that file's name (``file``).

    Its ``identity`` is the file's, so two files of one directory are two adapters of a batch.
    """

    def __init__(self, path: Path, error: type[AdapterError], *, fix: str) -> None:
        super().__init__(path.parent, error, fix=fix)
        self.file = path.name
        self.file_path = path
        st = self.lstat(path.name)
        if st is None:
            self.close()
            raise error(f"{path}: does not exist; {fix}")
        self.identity = (st.st_dev, st.st_ino)


def file_of(location: safefs.Directory) -> str | None:
    """The name of the one file ``location`` stands for (a single-file adapter), else None."""
    return location.file if isinstance(location, FileLocation) else None


def open_location(path: Path, expects: str) -> safefs.Directory:
    """Open an adapter location once; every later read and the rewrite go through this descriptor.

    A directory is opened as itself; a file (a single-file format) through its directory, by name.
    ``expects`` says what to pass instead when ``path`` cannot be one (``pass <expects>``).
    """
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return FileLocation(path, AdapterError, fix=f"pass {expects}")
    return safefs.Directory(path, AdapterError, fix=f"pass {expects}")


@contextmanager
def rewrite_lock(directory: safefs.Directory, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive lock on the adapter directory from reading the adapter to replacing it.

    A second run on the same adapter waits here, then reads what the first one wrote and sees its
    provenance: it reports the no-op or refuses, and never projects the original a second time. It
    is the lock of the directory's own descriptor (``locks.acquire``): no lock file to create
    (read-only directories still give their own error) or leave behind. ``on_wait`` is called once
    if another run holds the lock. A single-file adapter's lock is its file's (``_hold_file``).
    """
    if isinstance(directory, FileLocation):
        fd = _hold_file(directory, on_wait)
        try:
            yield
        finally:
            os.close(fd)
        return
    try:
        locks.acquire(directory.fd, on_wait)
    except OSError as e:
        raise InPlaceError(f"{directory.path}: cannot lock the adapter directory ({e.strerror})") from None
    try:
        yield
    finally:
        locks.release(directory.fd)


def _hold_file(location: FileLocation, on_wait: Callable[[], None]) -> int:
    """The lock of the file ``location`` names: taken on the file, then checked to be the file still
    named so (a run before this one renamed a new file in), else taken again on that one. Closing the
    returned descriptor releases it."""
    waited = False

    def wait_once() -> None:
        nonlocal waited
        if not waited:
            on_wait()
            waited = True

    while True:
        try:
            fd = os.open(location.file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=location.fd)
        except OSError as e:
            raise InPlaceError(safefs.os_error(location.file_path, e)) from None
        try:
            locks.acquire(fd, wait_once)
            now = os.stat(location.file, dir_fd=location.fd)
            held = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise InPlaceError(f"{location.file_path}: cannot lock the adapter file ({e.strerror})") from None
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def envelope_name(adapter: Adapter) -> str:
    """The name, in ``adapter.dir``, of the signed attestation of the adapter as written there.

    A directory format's is ``safelora.intoto.json``. A single-file format (a GGUF LoRA file, whose
    directory may hold several adapters) names it after its file, ``FILE.intoto.json``: this is the
    one place that decides it, and everything that signs, verifies, copies or removes an attestation
    asks here.
    """
    name = file_of(adapter.dir)
    return ENVELOPE if name is None else name + ENVELOPE_SUFFIX
