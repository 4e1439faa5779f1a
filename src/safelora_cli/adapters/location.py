"""An adapter location opened once, and the lock a rewrite holds on it."""

from __future__ import annotations

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


def open_location(path: Path, expects: str) -> safefs.Directory:
    """Open an adapter directory once; every later read and the rewrite go through this descriptor.

    ``expects`` says what to pass instead when ``path`` cannot be one (``pass <expects>``).
    """
    return safefs.Directory(path, AdapterError, fix=f"pass {expects}")


@contextmanager
def rewrite_lock(directory: safefs.Directory, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive lock on the adapter directory from reading the adapter to replacing it.

    A second run on the same adapter waits here, then reads what the first one wrote and sees its
    provenance: it reports the no-op or refuses, and never projects the original a second time. It
    is the lock of the directory's own descriptor (``locks.acquire``): no lock file to create
    (read-only directories still give their own error) or leave behind. ``on_wait`` is called once
    if another run holds the lock.
    """
    try:
        locks.acquire(directory.fd, on_wait)
    except OSError as e:
        raise InPlaceError(f"{directory.path}: cannot lock the adapter directory ({e.strerror})") from None
    try:
        yield
    finally:
        locks.release(directory.fd)


def envelope_name(adapter: Adapter) -> str:
    """The name, in ``adapter.dir``, of the signed attestation of the adapter as written there.

    A directory format's is ``safelora.intoto.json``. A single-file format (a GGUF LoRA file, whose
    directory may hold several adapters) names it after its file, ``FILE.intoto.json``: this is the
    one place that decides it, and everything that signs, verifies, copies or removes an attestation
    asks here.
    """
    return ENVELOPE
